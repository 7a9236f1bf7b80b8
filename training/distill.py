"""Guidance distillation: a student that gives the teacher's guided velocity in one pass.

The student is the teacher with a guidance embedding (``ModelConfig.guidance_distilled``),
starting from the teacher's weights: its embedding's last layer is zero, so before training it
is exactly the teacher's conditional model. Each step draws, for a batch, noise, a condition
(a class label, or a training caption's text embedding), a guidance scale w uniform in the
range and a time t (the teacher's logit-normal training times); it then

1. follows the frozen teacher's guided ODE from the noise to t in a few Euler steps (the
   student's inputs lie on the trajectories it will sample, and no image is read);
2. takes the teacher's guided velocity there, v_u + w (v_c - v_u): the target. Outside the
   teacher's guidance interval (its released sampler's) the target is the conditional
   velocity, as the sampler guides there, and w = 1 is fed to the student;
3. regresses the student's velocity at (x_t, t, y, w) on it (MSE), with AdamW and an EMA.

All randomness comes from one generator whose state each checkpoint keeps, so a resumed run
continues the uninterrupted one bit for bit. The finished EMA student is written as a
checkpoint directory to ``<out>/model``. ``init_from`` continues an earlier student (its EMA
weights, a fresh optimizer): the way to go on at another learning rate or guidance range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deco_export.model import DeCo, build_model
from runtimes.config import ModelConfig
from runtimes.fileio import atomic_write_text
from runtimes.sampler import guidance_flags, release_sampler

from . import state as ckpt
from .ema import EMA
from .losses import sample_t

__all__ = ["DistillConfig", "Distiller", "distill", "student_from_teacher"]


@dataclass
class DistillConfig:
    """A distillation run; saved in every checkpoint, and its fixed fields checked on resume."""

    teacher: str = "default"
    out: str = "runs/distill"
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    ema_decay: float = 0.999
    rollout_steps: int = 4
    time_shift: float | None = None
    init_from: str | None = None
    data: str | None = None
    text_encoder: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    threads: int | None = None
    log_every: int = 25
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rollout_steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                                 f"got {value!r}")
        for name in ("ckpt_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, "
                                 f"got {value!r}")
        lo, hi = self.guidance_min, self.guidance_max
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise ValueError(f"--guidance-range must be MIN:MAX with 0 <= MIN <= MAX, got "
                             f"{lo}:{hi}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie in [0, 1), got {self.ema_decay!r}")
        if self.time_shift is not None and not (math.isfinite(self.time_shift)
                                                and self.time_shift > 0):
            raise ValueError(f"--time-shift must be > 0, got {self.time_shift!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that may change when a run is resumed; the rest must match the run's.
RESUMABLE_CHANGES = {"steps", "out", "threads", "log_every", "ckpt_every", "keep_checkpoints",
                     "progress", "cache_dir"}


def student_from_teacher(teacher: DeCo) -> DeCo:
    """The teacher's model with a guidance embedding, holding the teacher's weights: equal to
    the teacher's conditional model, bit for bit, until it is trained."""
    if teacher.config.guidance_distilled:
        raise ValueError("the teacher is already guidance-distilled; distil a model that is "
                         "guided with classifier-free guidance")
    if not teacher.config.has_decoder:
        raise ValueError("guidance distillation needs a DeCo teacher (the plain DiT baseline "
                         "has no guidance embedding)")
    config = dataclasses.replace(teacher.config, guidance_distilled=True)
    student = build_model(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("dit.g_embedder.") for k in missing):
        raise ValueError(f"teacher weights do not fit the student: missing {missing}, "
                         f"unexpected {unexpected}")
    assert isinstance(student, DeCo)
    return student


class _Conditions:
    """Draws the conditions of a batch and holds the unconditional one: class labels and the
    null class (c2i), or training captions' text embeddings and the empty prompt's (t2i)."""

    def __init__(self, cfg: DistillConfig, config: ModelConfig, meta: dict[str, Any]) -> None:
        self.config = config
        self.text = None
        if config.is_text_to_image:
            from runtimes.cache import cache_dir as default_cache_dir

            from .captions import load_captioned
            from .text_cond import TextConditioning, load_text_encoder

            train = meta.get("training", {}).get("config", {})
            data = cfg.data or train.get("data")
            name = cfg.text_encoder or meta.get("text_encoder", {}).get("name")
            if not data or not name:
                raise ValueError("the teacher's metadata names no caption data or text encoder; "
                                 "pass --data and --text-encoder")
            captions = load_captioned(data, "train", config.image_size,
                                      cache_dir=cfg.cache_dir).captions
            encoder = load_text_encoder(name, config.text_len)
            self.text = TextConditioning(
                captions, encoder, cfg.cache_dir or default_cache_dir(),
                text_len=config.text_len, text_dim=config.text_dim, progress=False)
            self.count = len(self.text.offsets)

    def draw(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) of ``n`` samples."""
        if self.text is None:
            y = torch.randint(0, self.config.num_classes, (n,), generator=g)
            return y, torch.full((n,), self.config.null_class, dtype=torch.long)
        items = torch.randint(0, self.count, (n,), generator=g)
        coins = torch.rand(n, generator=g)
        y = self.text.pick(items, coins, torch.ones(n), 0.0)
        return y, self.text.empty.expand_as(y).contiguous()


class Distiller:
    """Builds the teacher, the student, its EMA and optimizer from a :class:`DistillConfig`;
    :meth:`fit` runs to ``cfg.steps``, checkpointing on the way."""

    def __init__(self, cfg: DistillConfig, *, resume: bool = False) -> None:
        from deco_export.pretrained import read_metadata
        from deco_export.sources import load_model, model_path

        from .trainer import init_weights, take_run_lock

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        self._lock = contextlib.ExitStack()
        take_run_lock(self._lock, self.out)
        try:
            latest = self._check_run_dir(resume)
            teacher, self.source = load_model(cfg.teacher)
            if not isinstance(teacher, DeCo):
                raise ValueError(f"{cfg.teacher} is not a DeCo model; guidance distillation "
                                 "needs one")
            self.teacher_meta = read_metadata(model_path(cfg.teacher), missing_ok=True)
            self.teacher = teacher.eval().requires_grad_(False)
            c = teacher.config
            self.release = release_sampler(c.family)
            shift = cfg.time_shift
            if shift is None:
                shift = self.teacher_meta.get("training", {}).get("config", {}).get(
                    "time_shift", 1.0)
            self.time_shift = float(shift)
            self.conditions = _Conditions(cfg, c, self.teacher_meta)
            torch.manual_seed(cfg.seed)
            self.student = student_from_teacher(teacher).train()
            self.lineage = self._lineage(cfg.init_from) if cfg.init_from else None
            if cfg.init_from and latest is None:  # a resumed run's weights are its own
                init_weights(self.student, cfg.init_from)
            self.ema = EMA(self.student, student_from_teacher(teacher), cfg.ema_decay)
            self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr,
                                               weight_decay=0.0)
            self.gen = torch.Generator().manual_seed(cfg.seed + 1)
            self.step = 0
            if latest is not None:
                self._load(latest)
        except BaseException:
            self._lock.close()
            raise

    @staticmethod
    def _lineage(spec: str) -> dict[str, Any]:
        """What ``--init-from`` names: its path, weights hash and its own distillation
        record, kept in the exported student's metadata so the whole training stays on
        record after the earlier student is gone."""
        from deco_export.pretrained import read_metadata
        from deco_export.sources import model_path

        meta = read_metadata(model_path(spec), missing_ok=True)
        return {"path": str(spec), "weights_sha256": meta.get("weights_sha256"),
                "distillation": meta.get("distillation")}

    # -- run directory -----------------------------------------------------------------------

    def _check_run_dir(self, resume: bool) -> Path | None:
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if resume:
            if latest is None:
                raise FileNotFoundError(f"no checkpoint under {self.ckpt_dir} to resume; drop "
                                        "--resume to start anew")
            saved = DistillConfig.from_dict(
                json.loads((latest / "state.json").read_text())["distill"])
            for f in dataclasses.fields(DistillConfig):
                a, b = getattr(saved, f.name), getattr(self.cfg, f.name)
                if f.name not in RESUMABLE_CHANGES and a != b:
                    raise ValueError(f"--resume with a different {f.name} ({b!r}, the run has "
                                     f"{a!r}); use the run's settings or a new --out")
            return latest
        if latest is not None:
            raise FileExistsError(f"{self.out} already holds a run (checkpoint {latest.name}); "
                                  "pass --resume to continue it or choose another --out")
        if self.out.is_dir() and any(p.name not in ("log.jsonl", "checkpoints")
                                     and not p.name.startswith(".") for p in self.out.iterdir()):
            raise FileExistsError(f"--out {self.out} is not empty; choose a new or empty "
                                  "directory")
        return None

    def _load(self, path: Path) -> None:
        data = ckpt.load_checkpoint(path)
        self.student.load_state_dict(data.model)
        self.ema.model.load_state_dict(data.ema)
        self.optimizer.load_state_dict(data.optimizer)
        self.gen.set_state(data.noise_rng)
        ckpt.restore_rng(data.rng)
        self.step = data.step

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.ckpt_dir, self.step,
            model=self.student.state_dict(), ema=self.ema.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            rng={"rank0": ckpt.capture_rng(), "noise": self.gen.get_state()},
            state={"distill": self.cfg.to_dict(),
                   "model_config": self.student.config.to_dict(), "teacher": self.source},
            keep=self.cfg.keep_checkpoints,
        )

    # -- one step ----------------------------------------------------------------------------

    @torch.no_grad()
    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The teacher's velocity as its released sampler guides it: v_u + w (v_c - v_u) where
        t lies in the guidance interval, the conditional velocity elsewhere (``w`` is the
        per-sample scale already set to 1 there)."""
        b = x.shape[0]
        out = self.teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, y]))
        v_u, v_c = out[:b], out[b:]
        return v_u + (v_c - v_u) * w.view(-1, 1, 1, 1)

    def effective_guidance(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """w where the teacher's sampler guides at time t, 1 elsewhere."""
        inside = guidance_flags(t.numpy(), self.release.guidance_interval, self.release.bounds)
        return torch.where(torch.from_numpy(inside), w, torch.ones_like(w))

    def batch(self) -> tuple[torch.Tensor, ...]:
        """(x_t, t, y, w_eff, target) of one step, drawn from the run's generator."""
        cfg, g, c = self.cfg, self.gen, self.student.config
        n = cfg.batch_size
        t = sample_t(n, shift=self.time_shift, generator=g)
        noise = torch.randn((n, c.in_channels, *c.image_size), generator=g)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(n, generator=g)
        y, uncond = self.conditions.draw(n, g)
        # The teacher's guided ODE from the noise (t = 0) to t, in rollout_steps Euler steps.
        x = noise
        dt = t / cfg.rollout_steps
        for k in range(cfg.rollout_steps):
            tk = dt * k
            v = self.guided_velocity(x, tk, y, uncond, self.effective_guidance(tk, w))
            x = x + v * dt.view(-1, 1, 1, 1)
        w_eff = self.effective_guidance(t, w)
        target = self.guided_velocity(x, t, y, uncond, w_eff)
        return x, t, y, w_eff, target

    def train_step(self) -> float:
        x_t, t, y, w, target = self.batch()
        v = self.student(x_t, t, y, w)
        loss = F.mse_loss(v, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss is {float(loss)} at step "
                                     f"{self.step + 1}; lower --lr")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        return float(loss.detach())

    # -- loop --------------------------------------------------------------------------------

    def fit(self) -> Path:
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(self.ckpt_dir)
        self._truncate_log()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step",
                   dynamic_ncols=True, smoothing=0.1)
        total, count, t0 = 0.0, 0, time.perf_counter()
        while self.step < cfg.steps:
            total += self.train_step()
            count += 1
            bar.update(1)
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                rec = {"step": self.step, "loss": total / count,
                       "s_per_step": (time.perf_counter() - t0) / count, "time": time.time()}
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                total, count, t0 = 0.0, 0, time.perf_counter()
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                self.save()
        bar.close()
        return self.export(self.out / "model")

    def _truncate_log(self) -> None:
        log = self.out / "log.jsonl"
        if log.is_file():
            lines = [x for x in log.read_text().splitlines() if x.strip()]
            keep = [x for x in lines if json.loads(x)["step"] <= self.step]
            if len(keep) != len(lines):
                atomic_write_text(log, "".join(x + "\n" for x in keep))

    def export(self, out_dir: Path) -> Path:
        """The EMA student as a checkpoint directory; its metadata names the teacher."""
        from deco_export.checkpoint import save_pretrained

        cfg = self.cfg
        meta: dict[str, Any] = {"distillation": {
            "teacher": self.source, "guidance_range": [cfg.guidance_min, cfg.guidance_max],
            "guidance_interval": list(self.release.guidance_interval),
            "step": self.step, "ema_decay": cfg.ema_decay, "config": cfg.to_dict()}}
        if self.lineage is not None:
            meta["distillation"]["init_from"] = self.lineage
        if "text_encoder" in self.teacher_meta:
            meta["text_encoder"] = self.teacher_meta["text_encoder"]
        start = f" from {cfg.init_from}" if cfg.init_from else ""
        source = f"deco distill-guidance: {cfg.teacher}, {self.step} steps{start} (EMA weights)"
        return save_pretrained(self.ema.model, out_dir, source=source, extra_metadata=meta,
                               force=True)

    def close(self) -> None:
        self._lock.close()


def distill(cfg: DistillConfig, *, resume: bool = False) -> Path:
    """Run a distillation and return the exported student's checkpoint directory."""
    run = Distiller(cfg, resume=resume)
    try:
        return run.fit()
    finally:
        run.close()
