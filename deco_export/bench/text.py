"""The text-to-image side of a benchmark: which prompts each batch encodes, the text encoder
timed as its own stage, and the text path's analytic share of a DiT step.

A text-to-image generation encodes its B prompts once (the bundle's ``text_encoder.onnx``; the
negative prompt is the bundle's stored encoding, so it costs nothing) and then runs the DiT and
decoder every step, so the encoder is a stage of its own, timed apart from the per-step graphs.
Every row, the PyTorch reference included, encodes with the bundle's ONNX encoder at the row's
thread count: the rows differ only in how they run the image model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..flops import graph_flops
from .settings import DEFAULT_PROMPTS


def prompts_for(batch: int, prompts: Sequence[str] = ()) -> list[str]:
    """The ``batch`` prompts of one generation: image i gets prompt i mod len(prompts)
    (`DEFAULT_PROMPTS` when none are given)."""
    chosen = list(prompts) or list(DEFAULT_PROMPTS)
    return [chosen[i % len(chosen)] for i in range(batch)]


class TimedTextEncoder:
    """A text encoder (``encode(prompts) -> (B, L, C)``) that accumulates the time its calls
    take, the calls and the prompts encoded; ``reset`` starts a new generation."""

    def __init__(self, inner: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner = inner
        self._clock = clock
        self.seconds = 0.0
        self.calls = 0
        self.prompts = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.prompts = 0.0, 0, 0

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        start = self._clock()
        out: np.ndarray = self.inner.encode(prompts)
        self.seconds += self._clock() - start
        self.calls += 1
        self.prompts += len(prompts)
        return out

    def __getattr__(self, name: str) -> Any:  # max_length, dim, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def text_path_share(model: Any, height: int, width: int) -> float:
    """The fraction of one DiT call's matrix-product FLOPs that the text path costs: the
    y_embedder, the refine blocks over the text tokens, each block's text keys/values and the
    image queries' attention to them (`deco_export.flops`; the same graph without text tokens
    is the image-only remainder)."""
    fields = dict(model) if isinstance(model, Mapping) else model.to_dict()
    text_len = int(fields.get("text_len", 0))
    whole = graph_flops(fields, "dit", 1, height, width)
    image_only = graph_flops({**fields, "text_len": 0, "refine_depth": 0}, "dit", 1, height,
                             width)
    return (whole - image_only) / whole if whole and text_len else 0.0
