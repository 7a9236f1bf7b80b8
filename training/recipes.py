"""The reference DeCo training recipes by name: every hyper-parameter of its configs, so a run
reproduces or fine-tunes a release without reading YAML (``deco train --recipe NAME``).

Values come from the reference configs (``configs_c2i/*.yaml``, ``configs_t2i/*.yaml``) and
its trainer's defaults. The batch is one process's: the reference's per-GPU batch times its
gradient accumulation (its global batch is that times the GPU count, which the configs do
not give); launch with torchrun and multiply ``--batch-size`` by the process count to match a
multi-GPU run. The plain-DiT baselines train as the DeCo config of their size with the
frequency loss off (the reference's ``training_repa.py``, the DeCo trainer without it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe", "get_recipe", "recipe_table"]


@dataclass(frozen=True)
class Recipe:
    """One reference config: the model preset and the `TrainConfig` fields it sets."""

    name: str
    preset: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)


# What every DeCo config shares (AdamW with no schedule; FM + 1.0 frequency loss + 0.5 REPA).
_C2I = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0, "grad_clip": 0.0,
        "warmup_steps": 0, "label_dropout": 0.1, "time_shift": 1.0, "repa_layer": 8,
        "repa_weight": 0.5, "freq_weight": 1.0, "freq_quality": 85, "ema_decay": 0.9999,
        "batch_size": 32, "grad_accum": 1}
_T2I = {**_C2I, "repa_layer": 6, "grad_clip": 1.0}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("DeCo_XL", "DeCo-XL/16", "ImageNet 256, DeCo-XL/16 (the reported model)",
           {**_C2I, "label_dropout": 0.2}),
    Recipe("DeCo_XL_512", "DeCo-XL/16-512",
           "ImageNet 512, continued from the 256 checkpoint (--init-from)",
           {**_C2I, "label_dropout": 0.2, "batch_size": 32, "grad_accum": 2}),
    Recipe("DeCo_large", "DeCo-L/16", "ImageNet 256, DeCo-L/16 (the ablation size)", _C2I),
    Recipe("Baseline_DiT_large", "DiT-L/16", "plain pixel DiT-L/16 baseline, ImageNet 256",
           {**_C2I, "freq_weight": 0.0}),
    Recipe("Baseline_DiT_XL", "DiT-XL/16", "plain pixel DiT-XL/16 baseline, ImageNet 256",
           {**_C2I, "label_dropout": 0.2, "freq_weight": 0.0}),
    Recipe("pretraining_res256", "DeCo-T2I", "text-to-image pretraining at 256",
           {**_T2I, "lr": 2e-4, "betas": (0.9, 0.95), "time_shift": 2.0, "batch_size": 192,
            "grad_accum": 3, "image_size": (256, 256)}),
    Recipe("pretraining_res512", "DeCo-T2I", "text-to-image pretraining at 512 (continued)",
           {**_T2I, "lr": 1e-4, "betas": (0.9, 0.95), "time_shift": 4.0, "batch_size": 64,
            "grad_accum": 4, "image_size": (512, 512)}),
    Recipe("sft_res512", "DeCo-T2I", "text-to-image fine-tuning at 512 (the release)",
           {**_T2I, "lr": 1e-5, "betas": (0.9, 0.999), "time_shift": 4.0, "batch_size": 64,
            "grad_accum": 4, "image_size": (512, 512)}),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_table(recipe: Recipe, overridden: Mapping[str, Any]) -> str:
    """The settings a run uses, one per line, marking those a flag replaced."""
    rows = [("preset", overridden.get("preset", recipe.preset), "preset" in overridden)]
    for key, value in recipe.settings.items():
        rows.append((key, overridden.get(key, value), key in overridden))
    width = max(len(k) for k, _, _ in rows)
    lines = [f"recipe {recipe.name}: {recipe.description}"]
    lines += [f"  {k:<{width}}  {v!r}{'  (flag)' if flagged else ''}" for k, v, flagged in rows]
    return "\n".join(lines)
