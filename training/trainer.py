"""The DeCo training loop: one file, nanoGPT-style, DDP through torchrun.

Run on one process (``deco train ...``) or many (``torchrun --nproc_per_node N -m
training.cli train ...``); torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR)
selects DDP with NCCL on GPUs and gloo on CPUs. ``batch_size`` is the global batch per
optimizer step, split over processes and accumulation steps.

Randomness is drawn so that a run does not depend on how it is sharded: every optimizer step
draws t, ε and the label-dropout coins for the whole global batch from one generator that all
processes share (same seed, same state), and each process keeps the rows of its own samples.
Data order comes from a seeded ``DistributedSampler``. So N processes reproduce one process
with the same global batch up to float summation order, and a resumed run reproduces an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from deco_export.config import get_preset
from deco_export.devices import torch_device
from deco_export.model import DeCo, PixelDiT, build_model
from runtimes.cache import cache_dir as default_cache_dir
from runtimes.config import ModelConfig
from runtimes.fileio import atomic_write_text
from runtimes.image import save_grid, to_uint8
from runtimes.locks import LockTimeout, lock, lock_path
from runtimes.memory import check_memory, training_step_bytes

from . import state as ckpt
from .captions import load_captioned
from .data import collate, load_dataset, to_model_input, to_unit_range
from .divergence import check_step, check_weights, gradient_max
from .ema import EMA
from .losses import FrequencyLoss, drop_labels, interpolate, sample_t
from .repa import FeatureHook, FrozenEncoder, ProjectionHead, load_encoder, repa_loss
from .sample import euler_sample, grid_labels
from .text_cond import TextConditioning, load_text_encoder

__all__ = ["TrainConfig", "Trainer", "default_repa_layer", "export_ema", "train"]


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``<out>/train_config.json`` and in every checkpoint."""

    preset: str = "DeCo-XS/4"
    data: str = "emoji"
    out: str = "runs/deco"
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 0.0
    ema_decay: float = 0.9999
    label_dropout: float = 0.1
    time_shift: float = 1.0
    freq_weight: float = 1.0
    freq_quality: int = 85
    repa_weight: float = 0.5
    repa_encoder: str | None = None
    repa_layer: int | None = None
    repa_encoder_patch: int | None = None
    image_size: tuple[int, int] | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    threads: int | None = None
    num_workers: int = 0
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_steps: int = 32
    sample_cfg: float = 3.0
    sample_per_class: int = 8
    text_encoder: str = "minilm"
    cache_dir: str | None = None
    progress: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None

    def __post_init__(self) -> None:
        # Checked before any data or model is built: `--steps 0` would otherwise "train"
        # nothing and export the untrained initialisation as the EMA model.
        # --log-every 0 would divide by zero at the first step.
        positive = ("steps", "batch_size", "grad_accum", "sample_steps", "sample_per_class",
                    "log_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        non_negative = ("warmup_steps", "sample_every", "ckpt_every",
                        "keep_checkpoints", "num_workers")
        for name in non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
                raise ValueError(f"{flag} must be an integer >= 0, got {value!r}")
        # A NaN weight would turn the first loss NaN; a NaN --sample-cfg would only show as a
        # diverged sample grid after the whole run: both are refused before any work.
        for name in ("lr", "ema_decay", "label_dropout", "time_shift", "freq_weight",
                     "repa_weight", "grad_clip", "weight_decay", "sample_cfg"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, "
                                 f"got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        if not self.time_shift > 0:
            # t/(t+(1-t)s) is 1 for every t at s = 0: the run would only see pure noise.
            raise ValueError(f"--time-shift must be > 0 (1 = no shift), got {self.time_shift!r}")
        if not 0 <= self.ema_decay <= 1 or not 0 <= self.label_dropout < 1:
            raise ValueError("--ema-decay must lie in [0, 1] and --label-dropout in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        if d.get("image_size"):
            d["image_size"] = tuple(d["image_size"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_FLAGS = {"num_workers": "--workers", "keep_checkpoints": "--keep"}  # CLI names that differ

# Fields that may change when a run is resumed (length, logging, machine); the rest must match.
RESUMABLE_CHANGES = {
    "steps", "out", "device", "threads", "num_workers", "log_every", "sample_every",
    "ckpt_every", "keep_checkpoints", "sample_steps", "sample_cfg", "sample_per_class",
    "cache_dir", "progress", "compile", "repa_encoder",
}  # fmt: skip

# Text-to-image runs: the CFG dropout replaces the caption by the empty prompt (the reference's
# 10 %), and sample grids show these many prompts (rows) from the training captions.
SAMPLE_PROMPTS = 8


def default_repa_layer(depth: int) -> int:
    """Block whose output REPA aligns: 8 as in the reference, at most half the DiT depth."""
    return max(1, min(8, depth // 2))


# ------------------------------------------------------------------------------------------------
# Distributed setup
# ------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Read torchrun's environment; start the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way (exact resume)."""

    start: int = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class Trainable(nn.Module):
    """The modules DDP synchronises: the DeCo model and, with REPA, the projection head.

    ``forward`` returns the velocity and the projected block-k tokens (None without REPA).
    """

    def __init__(
        self, model: DeCo | PixelDiT, head: ProjectionHead | None, layer: int | None
    ) -> None:
        super().__init__()
        self.model, self.head = model, head
        self.hook = FeatureHook(model.dit.blocks[layer - 1]) if head is not None else None

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        v = self.model(x_t, t, y)
        if self.head is None:
            return v, None
        return v, self.head(self.hook.pop())


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: CUDA allocations on a GPU, resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here


def _noise_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`fit` runs to ``cfg.steps``."""

    def __init__(
        self, cfg: TrainConfig, *, resume: bool = False, text_encoder: Any = None
    ) -> None:
        """``text_encoder`` replaces the one ``cfg.text_encoder`` names (t2i presets only):
        any object with ``encode(prompts)``, ``max_length``, ``dim`` and an ``identity``."""
        self.cfg = cfg
        self.dist = d = setup_distributed(cfg.device)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        if cfg.batch_size % (d.world * cfg.grad_accum):
            raise ValueError(
                f"--batch-size {cfg.batch_size} must be divisible by processes x accumulation "
                f"({d.world} x {cfg.grad_accum})"
            )
        self.micro = cfg.batch_size // (d.world * cfg.grad_accum)
        if d.device.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
        # Held until close(): a second run into the same --out would interleave its steps in
        # one log and overwrite this run's checkpoints.
        self._run_lock = contextlib.ExitStack()
        if d.main:
            take_run_lock(self._run_lock, self.out)
        try:
            self._build(resume, text_encoder)
        except BaseException:
            self._run_lock.close()
            raise

    def _build(self, resume: bool, text_encoder: Any) -> None:
        cfg, d = self.cfg, self.dist
        resume_from = self._check_run_dir(resume)

        # Data (train split) and the model config it implies.
        base = get_preset(cfg.preset, **cfg.model_overrides)
        size = tuple(cfg.image_size) if cfg.image_size else base.image_size
        if d.device.type == "cpu":  # before any data is loaded or any weight allocated
            check_memory(training_step_bytes(base, self.micro, *size),
                         f"training at {size[0]}x{size[1]} with {self.micro} images per "
                         "micro-batch", "lower --image-size or --batch-size, or raise --grad-accum")
        self.text: TextConditioning | None = None
        if base.is_text_to_image:
            self.dataset = load_captioned(cfg.data, "train", size, cache_dir=cfg.cache_dir)
            self.model_config = dataclasses.replace(base, image_size=size)
        else:
            self.dataset = load_dataset(cfg.data, "train", size, cache_dir=cfg.cache_dir)
            self.model_config = dataclasses.replace(
                base, image_size=size, num_classes=self.dataset.num_classes
            )
        if len(self.dataset) < cfg.batch_size:
            raise ValueError(
                f"dataset '{cfg.data}' has {len(self.dataset)} training images, fewer than "
                f"--batch-size {cfg.batch_size}"
            )
        if base.is_text_to_image:
            c = self.model_config
            encoder = text_encoder or load_text_encoder(cfg.text_encoder, c.text_len)
            self.text = TextConditioning(
                self.dataset.captions, encoder, cfg.cache_dir or default_cache_dir(),
                text_len=c.text_len, text_dim=c.text_dim, progress=cfg.progress and d.main,
            )  # fmt: skip

        # Model, EMA, REPA, optimizer. Same seed on every rank: identical initial weights.
        torch.manual_seed(cfg.seed)
        model = build_model(self.model_config)
        if cfg.init_from and resume_from is None:  # a resumed run's weights are its own
            init_weights(model, cfg.init_from)
        model = model.to(d.device)
        self.ema = EMA(model, build_model(self.model_config).to(d.device), cfg.ema_decay)
        self.encoder: FrozenEncoder | None = None
        head = None
        self.repa_layer = None
        if cfg.repa_encoder and cfg.repa_weight > 0:
            self.encoder = load_encoder(cfg.repa_encoder, cfg.repa_encoder_patch).to(d.device)
            self.repa_layer = cfg.repa_layer or default_repa_layer(self.model_config.dit_depth)
            depth = self.model_config.dit_depth
            if not 1 <= self.repa_layer <= depth:
                raise ValueError(f"--repa-layer {self.repa_layer} is outside the DiT's 1..{depth}")
            head = ProjectionHead(
                self.model_config.hidden_size, self.encoder.output_dim(d.device)
            ).to(d.device)
        self.module = Trainable(model, head, self.repa_layer)
        self.model = model
        if cfg.compile:
            model.compile()
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.freq_loss = FrequencyLoss(cfg.freq_quality).to(d.device)
        self.noise_gen = _noise_generator(cfg.seed + 1, d.device)
        self.step, self.epoch, self.consumed = 0, 0, 0
        if resume_from is not None:
            self._load(resume_from)
        self.start_step = self.step  # a NaN at this run's first step points at data, not lr
        self.ddp: nn.Module = self.module
        if d.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
        self.sampler = ResumableSampler(
            self.dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed,
            drop_last=True,
        )  # fmt: skip
        self._sample_noise = None

    # -- run directory ---------------------------------------------------------------------------

    def _check_run_dir(self, resume: bool) -> Path | None:
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if resume:
            if latest is None:
                raise FileNotFoundError(
                    f"no checkpoint under {self.ckpt_dir} to resume; drop --resume to start anew"
                )
            saved = TrainConfig.from_dict(json.loads((latest / "state.json").read_text())["train"])
            for f in dataclasses.fields(TrainConfig):
                if f.name in RESUMABLE_CHANGES:
                    continue
                a, b = getattr(saved, f.name), getattr(self.cfg, f.name)
                if a != b:
                    raise ValueError(
                        f"--resume with a different {f.name} ({b!r}, the run has {a!r}); "
                        "use the run's settings or a new --out"
                    )
            if saved.repa_encoder and not self.cfg.repa_encoder and saved.repa_weight > 0:
                raise ValueError(
                    f"the run was trained with REPA ({saved.repa_encoder}); pass --repa-encoder"
                )
            return latest
        if latest is not None:
            raise FileExistsError(
                f"{self.out} already holds a run (checkpoint {latest.name}); pass --resume to "
                "continue it or choose another --out"
            )
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {self.out} is a file; choose a run directory")
        ours = {"train_config.json", "log.jsonl", "checkpoints", "samples", "loss.png", "model"}
        # Hidden entries are skipped: a killed run's lock or staging leftovers (".model.lock",
        # ".model.staging-*"), or a user's ".git", none of which a run writes over.
        foreign = sorted(p.name for p in self.out.iterdir() if p.name not in ours
                         and not p.name.startswith(".")) if self.out.is_dir() else []
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise FileExistsError(
                f"--out {self.out} is not empty and is not a training run (it holds {shown}); "
                "choose a new or empty directory"
            )
        return None

    # -- checkpoints -----------------------------------------------------------------------------

    def _gather_rng(self) -> dict[str, Any]:
        local = ckpt.capture_rng()
        if self.dist.world == 1:
            states = [local]
        else:
            states = [None] * self.dist.world
            dist.all_gather_object(states, local)
        rng: dict[str, Any] = {f"rank{r}": s for r, s in enumerate(states)}
        rng["noise"] = self.noise_gen.get_state()
        return rng

    def save(self) -> Path | None:
        """Collective (every rank must call it); rank 0 writes the checkpoint.

        Non-finite weights stop the run instead (every rank holds the same weights, so every
        rank stops): rotation must never replace the last finite checkpoint by a NaN one."""
        check_weights(self.step, {"model": self.model.state_dict(),
                                  "EMA": self.ema.model.state_dict()}, self.cfg)
        rng = self._gather_rng()
        if not self.dist.main:
            return None
        head = self.module.head.reference_state_dict() if self.module.head is not None else None
        return ckpt.save_checkpoint(
            self.ckpt_dir,
            self.step,
            model=self.model.state_dict(),
            ema=self.ema.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            rng=rng,
            repa_head=head,
            state={
                "epoch": self.epoch,
                # Samples of this epoch already used, counted over all processes, so that a run
                # can resume on a different number of processes.
                "epoch_position": self.consumed * self.micro * self.dist.world,
                "train": self.cfg.to_dict(),
                "model_config": self.model_config.to_dict(),
                "world_size": self.dist.world,
                **({"text_encoder": self._text_meta()} if self.text is not None else {}),
            },
            keep=self.cfg.keep_checkpoints,
        )

    def _text_meta(self) -> dict[str, Any]:
        """What a sampler needs to rebuild the conditioning: the encoder and its length."""
        assert self.text is not None
        return {
            "name": self.cfg.text_encoder,
            "max_length": int(self.text.encoder.max_length),
            "dim": int(self.text.encoder.dim),
            "identity": self.text.identity,
        }

    def _load(self, path: Path) -> None:
        data = ckpt.load_checkpoint(path, self.dist.rank)
        saved_model = ModelConfig.from_dict(data.state["model_config"])
        if saved_model != self.model_config:
            raise ValueError(
                f"{path} holds a {saved_model} model, not {self.model_config}; use the run's "
                "preset and data"
            )
        if self.text is not None:
            saved = data.state.get("text_encoder", {}).get("identity")
            if saved != self.text.identity:
                raise ValueError(
                    f"{path} was trained with another text encoder ({saved}, this one is "
                    f"{self.text.identity}); resume with the run's --text-encoder"
                )
        self.model.load_state_dict(data.model)
        self.ema.model.load_state_dict(data.ema)
        if self.module.head is not None:
            if data.repa_head is None:
                raise ValueError(f"{path} has no REPA head; resume without --repa-encoder")
            n = len("diffusion_trainer.")
            self.module.head.load_state_dict({k[n:]: v for k, v in data.repa_head.items()})
        self.optimizer.load_state_dict(data.optimizer)
        self.noise_gen.set_state(data.noise_rng)
        ckpt.restore_rng(data.rng)
        self.step, self.epoch = data.step, data.state["epoch"]
        self.consumed = data.state["epoch_position"] // (self.micro * self.dist.world)
        if data.state.get("world_size", 1) != self.dist.world and self.dist.main:
            print(
                f"note: resuming a {data.state['world_size']}-process run on {self.dist.world} "
                "processes; the data order continues from the same global position"
            )

    # -- data ------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches forever, from (epoch, consumed) on, in whole optimizer steps."""
        per_step = self.cfg.grad_accum
        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.consumed * self.micro
            # A private generator: creating a loader must not draw from the global RNG.
            loader = DataLoader(
                self.dataset,
                batch_sampler=BatchSampler(self.sampler, self.micro, drop_last=True),
                collate_fn=collate,
                num_workers=self.cfg.num_workers,
                pin_memory=self.dist.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch),
            )
            left = len(self.sampler) // self.micro
            usable = left - left % per_step  # whole optimizer steps only
            it = iter(loader)
            for _ in range(usable):
                batch = next(it)
                self.consumed += 1
                yield batch
            del it, loader
            self.epoch, self.consumed = self.epoch + 1, 0

    # -- one optimizer step ----------------------------------------------------------------------

    def _draw(self, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """Global-batch randomness, identical on every rank: (t, ε, dropout coins) and, for
        text, the caption coins (drawn last, so the class-label stream is unchanged)."""
        g, dev = self.noise_gen, self.dist.device
        t = sample_t(n, shift=self.cfg.time_shift, generator=g, device=dev)
        noise = torch.randn((n, *shape), generator=g, device=dev)
        coins = torch.rand(n, generator=g, device=dev)
        if self.text is None:
            return t, noise, coins, coins
        return t, noise, coins, torch.rand(n, generator=g, device=dev)

    def train_step(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        cfg, d = self.cfg, self.dist
        c = self.model_config
        shape = (c.in_channels, *c.image_size)
        t_all, noise_all, coins_all, caption_all = self._draw(cfg.batch_size, shape)
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grid = (c.image_size[0] // c.patch_size, c.image_size[1] // c.patch_size)
        totals = {k: torch.zeros((), device=d.device) for k in ("loss", "mse", "freq", "repa")}
        for m in range(cfg.grad_accum):
            images, labels = next(batches)
            images = images.to(d.device, non_blocking=True)
            labels = labels.to(d.device, non_blocking=True)
            # Rows of this rank's samples in the global batch (DistributedSampler interleaves).
            start = d.world * m * self.micro + d.rank
            rows = slice(start, start + d.world * self.micro, d.world)
            t, noise, coins = t_all[rows], noise_all[rows], coins_all[rows]
            if self.text is not None:
                y = self.text.pick(labels, caption_all[rows], coins, cfg.label_dropout)
                y = y.to(d.device, non_blocking=True)
            else:
                y = drop_labels(labels, cfg.label_dropout, c.null_class, coins=coins)
            x = to_model_input(images)
            x_t, target = interpolate(x, noise, t)
            sync = m == cfg.grad_accum - 1 or d.world == 1
            ctx = nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    v, proj = self.ddp(x_t, t, y)
                    if proj is not None:
                        feats = self.encoder(to_unit_range(images), grid)
                mse = F.mse_loss(v.float(), target)
                freq = self.freq_loss(v, target) if cfg.freq_weight else torch.zeros_like(mse)
                loss = mse + cfg.freq_weight * freq
                rl = torch.zeros_like(mse)
                if proj is not None:
                    rl = repa_loss(proj, feats)
                    loss = loss + cfg.repa_weight * rl
                (loss / cfg.grad_accum).backward()
            for k, val in zip(totals, (loss, mse, freq, rl), strict=True):
                totals[k] += val.detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                self.module.parameters(), cfg.grad_clip
            )
        # Before the update: a NaN that reached the optimizer would spread into every weight.
        check_step(self.step + 1, self.start_step + 1, totals,
                   gradient_max(self.module.parameters()), cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        return totals

    # -- outputs ---------------------------------------------------------------------------------

    def sample_grid(self) -> Path:
        """EMA samples, one row per class (or training prompt), fixed noise so grids are
        comparable across steps."""
        c = self.model_config
        uncond = None
        if self.text is not None:
            prompts = self.text.first_captions(SAMPLE_PROMPTS)
            per = self.cfg.sample_per_class
            labels = self.text.embed(prompts).repeat_interleave(per, 0).to(self.dist.device)
            uncond = self.text.empty.expand_as(labels).to(self.dist.device)
        else:
            labels = grid_labels(c.num_classes, self.cfg.sample_per_class).to(self.dist.device)
        if self._sample_noise is None:
            g = torch.Generator().manual_seed(1234)
            shape = (len(labels), c.in_channels, *c.image_size)
            self._sample_noise = torch.randn(shape, generator=g).to(self.dist.device)
        x = euler_sample(
            self.ema.model, self._sample_noise, labels, num_steps=self.cfg.sample_steps,
            cfg_scale=self.cfg.sample_cfg, autocast=self.amp, uncond=uncond,
        )  # fmt: skip
        scale = max(1, 128 // max(c.image_size))
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        return save_grid(to_uint8(x.float().cpu().numpy()), path, cols=self.cfg.sample_per_class,
                         scale=scale, pad_value=255)

    def _truncate_log(self) -> None:
        """Drop records written after the checkpoint a run resumes from (they are redone)."""
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        lines = log.read_text().splitlines()
        keep = [x for x in lines if x.strip() and json.loads(x)["step"] <= self.step]
        if len(keep) != len(lines):
            atomic_write_text(log, "".join(x + "\n" for x in keep))

    def _log(self, record: dict[str, Any]) -> None:
        path = self.out / "log.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a failed write (a full disk) names no file
            raise OSError(err.errno, err.strerror, str(path)) from None

    def plot_losses(self) -> Path | None:
        return plot_loss_curve(self.out / "log.jsonl", self.out / "loss.png")

    # -- loop ------------------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train to ``cfg.steps``; checkpoint, sample, log; export the EMA weights at the end."""
        cfg, d = self.cfg, self.dist
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale(self.ckpt_dir)
            self._truncate_log()
            atomic_write_text(
                self.out / "train_config.json",
                json.dumps({"train": cfg.to_dict(), "model": self.model_config.to_dict()}, indent=1)
                + "\n",
            )
            warn_short_ema(cfg)
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (d.main and cfg.progress),
            unit="step", dynamic_ncols=True, smoothing=0.1,
        )  # fmt: skip
        batches = self._batches()
        acc: dict[str, torch.Tensor] = {}
        n_acc, t0, img0 = 0, time.perf_counter(), 0
        self.module.train()
        while self.step < cfg.steps:
            stats = self.train_step(batches)
            for k, v in stats.items():
                acc[k] = acc.get(k, 0) + v
            n_acc += 1
            img0 += cfg.batch_size
            bar.update(1)
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                keys = sorted(acc)
                vec = torch.stack([acc[k] / n_acc for k in keys])
                if d.world > 1:
                    dist.all_reduce(vec)
                    vec /= d.world
                elapsed = time.perf_counter() - t0
                rec = {"step": self.step, **{k: float(x) for k, x in zip(keys, vec, strict=True)}}
                rec.update(lr=self.optimizer.param_groups[0]["lr"], img_per_s=img0 / elapsed,
                           peak_mem_mib=peak_memory_mib(d.device))
                rec["time"] = time.time()
                if d.main:
                    self._log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                acc, n_acc, t0, img0 = {}, 0, time.perf_counter(), 0
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                self.save()
            if d.main and ((cfg.sample_every and self.step % cfg.sample_every == 0) or last):
                self.sample_grid()
                self.plot_losses()
        bar.close()
        exported = self.out / "model"
        if d.main:
            export_ema(self, exported)
        if d.world > 1:
            dist.barrier()
        return exported

    def close(self) -> None:
        if self.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self._run_lock.close()


def init_weights(model: DeCo | PixelDiT, spec: str) -> None:
    """Start ``model`` from a released model's weights (``--init-from``): a reference ``.ckpt``
    (its EMA weights), a checkpoint directory of ours or an embedded model's name. Strict: the
    source must describe the same weights (any native image size), every tensor must fit."""
    from deco_export.pretrained import load_state_strict
    from deco_export.sources import load_model

    source, _ = load_model(spec, weights="ema")
    if not source.config.same_weights_as(model.config):
        raise ValueError(
            f"--init-from {spec} is a {source.config.to_dict()} model, not the "
            f"{model.config.to_dict()} this run trains; pass the matching --preset (and data)"
        )
    load_state_strict(model, source.state_dict(), source=str(spec))


def take_run_lock(stack: contextlib.ExitStack, out: Path) -> None:
    """Enter the write lock of a run directory (the one exports take, `runtimes.locks.lock`)
    into ``stack``, without waiting: another run into it may last hours."""
    try:
        stack.enter_context(lock(out, timeout=0))
    except LockTimeout:
        try:
            pid = lock_path(out).read_text().strip()
        except OSError:
            pid = ""
        holder = f" (pid {pid})" if pid.isdigit() else ""
        raise LockTimeout(
            f"--out {out} is being trained by another process{holder}; wait for it to finish "
            "(then continue it with --resume) or choose another --out"
        ) from None


def warn_short_ema(cfg: TrainConfig) -> None:
    horizon = 1.0 / (1.0 - cfg.ema_decay) if cfg.ema_decay < 1 else math.inf
    if 100 <= cfg.steps < 2 * horizon:
        print(
            f"note: --ema-decay {cfg.ema_decay} averages over ~{horizon:.0f} steps but the run "
            f"has {cfg.steps}; the EMA weights will lag far behind (try --ema-decay "
            f"{1 - 10 / max(cfg.steps, 10):.4g})"
        )


def plot_loss_curve(log_path: Path, out_path: Path) -> Path | None:
    """Loss (and its parts) against step from the JSON-lines log, log-scale, as a PNG."""
    if not log_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in recs]
    for key in ("loss", "mse", "freq", "repa"):
        vals = [r.get(key, 0.0) for r in recs]
        if any(v > 0 for v in vals):
            ax.plot(steps, vals, label=key, lw=1.5 if key == "loss" else 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path


def export_ema(trainer_or_ckpt: Trainer | str | Path, out_dir: str | Path) -> Path:
    """Write EMA weights in the deco_export checkpoint format (``save_pretrained``).

    Takes a live :class:`Trainer` or a training checkpoint directory (``.../step_N``) or a run
    directory (its newest checkpoint).
    """
    from deco_export.checkpoint import save_pretrained

    if isinstance(trainer_or_ckpt, Trainer):
        tr = trainer_or_ckpt
        model, step, train_cfg = tr.ema.model, tr.step, tr.cfg.to_dict()
        text = tr._text_meta() if tr.text is not None else None
    else:
        path = Path(trainer_or_ckpt)
        if not (path / "state.json").is_file():
            found = ckpt.latest_checkpoint(path / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"no training checkpoint under {path}")
            path = found
        data = ckpt.load_checkpoint(path)
        model = build_model(ModelConfig.from_dict(data.state["model_config"]))
        model.load_state_dict(data.ema)
        step, train_cfg = data.step, data.state["train"]
        text = data.state.get("text_encoder")
    source = f"deco train: {train_cfg['data']}, {step} steps (EMA weights)"
    meta: dict[str, Any] = {
        "training": {"step": step, "ema_decay": train_cfg["ema_decay"], "config": train_cfg}
    }
    if text is not None:
        meta["text_encoder"] = text
    # A live trainer writes into its own run directory, checked when the run began.
    own = isinstance(trainer_or_ckpt, Trainer)
    return save_pretrained(model, out_dir, source=source, extra_metadata=meta, force=own)


def train(cfg: TrainConfig, *, resume: bool = False, text_encoder: Any = None) -> Path:
    """Build a :class:`Trainer`, run it and return the exported EMA model directory."""
    trainer = Trainer(cfg, resume=resume, text_encoder=text_encoder)
    try:
        return trainer.fit()
    finally:
        trainer.close()
