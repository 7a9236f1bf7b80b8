"""The models the benchmark protocols under ``scripts/`` run, by case name: the golden tiny
model and random-weight DeCo models at the DiT-S and DiT-B widths (zero-initialised tensors
get small noise, so the images are not flat and every layer does work).

Each case is made once into a checkpoint directory and reused, so every protocol and every
rerun benchmarks the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CASES", "RANDOM_SHAPES", "case_model", "make_checkpoint"]

CASES = {
    "golden64": "golden tiny model (64 wide, 2 DiT blocks, patch 16, 10 classes) at 64x64",
    "s16-256": "DeCo-S/16 (256 wide, 6 DiT blocks, patch 16, 1000 classes), random weights, "
               "at 256x256",
    "dit-s16-256": "an S/16-like DeCo (DiT-S: 384 wide, 6 heads, 12 blocks; patch 16, 1000 "
                   "classes), random weights, at 256x256",
    "dit-b16-256": "a B/16-like DeCo (DiT-B: 768 wide, 12 heads, 12 blocks; patch 16, 1000 "
                   "classes), random weights, at 256x256",
}
# The DiT-S and DiT-B widths on the DeCo-S/16 preset (its decoder: 32 wide, 3 blocks).
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "s16-256": {},
    "dit-s16-256": {"hidden_size": 384, "num_heads": 6, "dit_depth": 12},
    "dit-b16-256": {"hidden_size": 768, "num_heads": 12, "dit_depth": 12},
}


def case_model(case: str, golden: Path, seed: int = 0) -> Any:
    """The case's model: the golden reference checkpoint ``golden`` (the test fixture) at
    64x64, or a random-weight model from ``seed``."""
    from deco_export import get_preset
    from deco_export.checkpoint import load_reference
    from deco_export.model import random_model

    if case == "golden64":
        return load_reference(golden, image_size=(64, 64))
    if case not in RANDOM_SHAPES:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    return random_model(get_preset("DeCo-S/16", **RANDOM_SHAPES[case]), seed)


def make_checkpoint(case: str, models: Path, seed: int, golden: Path,
                    made_by: str = "deco_export.bench.cases") -> Path:
    """The case's model as a checkpoint directory under ``models`` (made once, then reused)."""
    from deco_export.checkpoint import save_pretrained

    path = models / case
    if (path / "config.json").is_file():
        return path
    return save_pretrained(case_model(case, golden, seed), path,
                           source=f"{made_by} {case} (seed {seed})")
