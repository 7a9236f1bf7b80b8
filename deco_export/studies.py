"""What the solver and distillation studies share (scripts/studies/solver_study.py,
tuned_study.py, solver_kid_study.py, distill_study.py): the embedded models' bundles they
measure, the held-out noises' seed and conditions, prompts paired with the held-out images they
name, a progress line, and the frame of their NFE plots. The studies are thin protocols
that regenerate docs/sampling.md's tables; this is the part they would otherwise import from
one another."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NOISE_SEED", "PROMPTS", "SOLVERS", "bundle_for", "condition_rows", "conditions",
           "held_out_prompts", "log", "nfe_axes", "save_figure"]

SOLVERS = ("euler", "heun", "ab2", "ab3", "dpm++2m", "unipc")
NOISE_SEED = 1  # the held-out noises: no calibration or table record uses this seed
# Emoji names (CLDR short names, as the text-to-image model was trained on), 16 of them.
PROMPTS = ("grinning face", "red heart", "cat face", "thumbs up", "fire", "rocket",
           "smiling face with sunglasses", "face with tears of joy", "green apple", "sun",
           "crying face", "dog face", "pizza", "star", "ghost", "snowman")


def log(*parts: Any) -> None:
    """A timestamped progress line on stderr."""
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def bundle_for(name: str, work: Path) -> Path:
    """An fp32 ONNX bundle of the embedded model ``name`` (exported once, then reused)."""
    root = work / f"bundle-{name}"
    if (root / "manifest.json").is_file():
        return root
    from .export.onnx import export_onnx
    from .sources import load_model

    model, source = load_model(name)
    log(f"exporting {root}")
    export_onnx(model.float().eval(), root, precisions=("fp32",), source=source,
                parity_steps=10)
    return root


def held_out_prompts(real_count: int, image_size: tuple[int, int], num: int
                     ) -> tuple[list[str], np.ndarray]:
    """``num`` prompts, each the caption of a held-out emoji, and the position of that emoji
    among the ``real_count`` features a `training.metrics.HeldOutScorer` holds (the held-out
    images in `training.metrics.held_out_order`): the pairing prompt following is scored on."""
    from training.captions import load_captioned
    from training.data import load_dataset
    from training.metrics import held_out_order

    test = load_captioned("emoji", "test", image_size)
    ds = load_dataset("emoji", "test", image_size)
    order = held_out_order(len(ds), real_count)
    if not np.array_equal(np.asarray(test.images), np.asarray(ds.images)):
        raise SystemExit("the captioned and the scored held-out emoji differ; cannot pair "
                         "prompts with their images")
    position = {int(j): k for k, j in enumerate(order)}
    picks = [int(order[i % len(order)]) for i in range(num)]
    return [test.captions[j][0] for j in picks], np.asarray([position[j] for j in picks])


def condition_rows(cond: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """``generate`` keywords of images start..stop from ``cond``'s per-image rows; the negative
    prompt's embeddings are one row for every image and pass whole."""
    return {k: v if k == "negative_prompt_embeds" else v[start:stop] for k, v in cond.items()}


def conditions(pipe: Any, name: str, num: int) -> dict[str, Any]:
    """Labels cycling over the classes, or held-out emoji names encoded once."""
    cfg = pipe.model_config
    if not cfg.is_text_to_image:
        return {"class_labels": [i % cfg.num_classes for i in range(num)]}
    from .sampling import open_pipeline

    torch_pipe = open_pipeline(name)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num)]
    embeds = np.asarray(torch_pipe.text_encoder.encode(prompts), dtype=np.float32)
    negative = np.asarray(torch_pipe.text_encoder.encode([""]), dtype=np.float32)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "prompts": prompts}


def nfe_axes(ax: Any, ylabel: str, title: str, ticks: tuple[int, ...] = (4, 6, 8, 10, 16, 25,
                                                                          50, 100),
             legend: dict[str, Any] | None = None) -> None:
    """NFE on a log axis with the given ticks, the labels, a grid and the legend: the frame of
    every solver study's plot."""
    ax.set_xscale("log")
    ax.set_xticks(list(ticks))
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("NFE (model evaluations per CFG branch)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or {"fontsize": 7, "ncol": 2}))


def save_figure(fig: Any, path: Path) -> None:
    """Lay out and write ``fig`` as a PNG, creating its folder."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
