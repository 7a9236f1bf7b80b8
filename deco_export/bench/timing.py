"""``TimingBackend``: a Backend proxy that times each stage of the sampler."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from runtimes.graphs import GRAPH_SPECS


class TimingBackend:
    """A `runtimes.Backend` that forwards every call to ``inner`` and times the graph calls.

    ``dit``, ``dit_hidden``, ``refresh_condition`` and a text-to-image DiT's once-per-generation
    ``embed_text`` count as the DiT stage, ``decoder`` and
    the split decoder's ``decoder_cond`` and ``decoder_pixel`` as the decoder stage, and a fused
    whole-step ``step`` as its own stage. Only the capabilities
    ``inner`` has are exposed, so the sampler takes the same path through the proxy as without
    it. When ``inner`` has ``synchronize()`` (async GPU backends), it is called before and after
    each timed call so device work lands in the stage that queued it.
    """

    # Each graph call's stage is its record's; the fused step is a stage of its own.
    STAGES: ClassVar[dict[str, str]] = {
        **{method: g.stage for g in GRAPH_SPECS if g.sampled for method, _ in g.calls},
        "step": "step"}

    def __init__(self, inner: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner = inner
        self._clock = clock
        sync = getattr(inner, "synchronize", None)
        self._sync: Callable[[], None] | None = sync if callable(sync) else None
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.reset()
        for name, stage in self.STAGES.items():
            fn = getattr(inner, name, None)
            if callable(fn):
                setattr(self, name, self._timed(fn, name, stage))

    def _timed(self, fn: Callable[..., Any], name: str, stage: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.synchronize()
            start = self._clock()
            out = fn(*args, **kwargs)
            self.synchronize()
            self.seconds[stage] += self._clock() - start
            self.calls[name] += 1
            return out

        call.__name__ = name
        call.__doc__ = getattr(fn, "__doc__", None)
        return call

    def reset(self) -> None:
        self.seconds = {"dit": 0.0, "decoder": 0.0, "step": 0.0}
        self.calls = dict.fromkeys(self.STAGES, 0)

    def synchronize(self) -> None:
        if self._sync is not None:
            self._sync()

    # The array half of the protocol is forwarded untimed: it is sampler overhead.
    def from_numpy(self, a: np.ndarray) -> Any:
        return self.inner.from_numpy(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.inner.to_numpy(a)

    def concat(self, arrays: Sequence[Any]) -> Any:
        return self.inner.concat(arrays)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def __getattr__(self, name: str) -> Any:  # flags (supports_refresh, runtime, ...) and extras
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
