"""What happens between two solver steps: the application's step callback (live preview and
stop), cancellation from another thread, and the inpainting blend.

The sampler calls one hook after every step with the latent the step started from, the slope
the solver took there and the latent it produced; everything an application sees of a running
generation is built here, so the solvers stay free of it. In pixel space x_t is already an
image, and with t = 1 data and v = x - eps the clean estimate is x̂ = x_t + (1 - t) v: a
preview needs no decoder.

Stopping: ``on_step(state)`` returning `STOP`, or a ``cancel`` object (a `threading.Event`, or
anything with ``is_set()``) being set, ends the run after the current step with
`GenerationInterrupted`, which carries the partial result. A sentinel rather than a truthy
value: callbacks such as ``lambda s: bar.update(1)`` return True or other values by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from runtimes.errors import DecoError

__all__ = [
    "STOP",
    "Cancellable",
    "GenerationInterrupted",
    "Inpainting",
    "StepHook",
    "StepState",
    "noised",
]


class _Stop:
    """The value a step callback returns to end the run."""

    def __repr__(self) -> str:
        return "runtimes.STOP"


STOP = _Stop()


class Cancellable(Protocol):
    """What ``cancel=`` takes: a `threading.Event` or anything that answers ``is_set()``."""

    def is_set(self) -> bool: ...


def noised(image: np.ndarray, eps: np.ndarray, t: float) -> np.ndarray:
    """x_t = t image + (1 - t) eps in float32 (t = 1 is the image itself, bit for bit)."""
    t32 = np.float32(t)
    out: np.ndarray = (t32 * image + (np.float32(1.0) - t32) * eps).astype(np.float32)
    return out


@dataclass(frozen=True)
class Inpainting:
    """Known pixels and where to generate: ``mask`` (B or 1, 1 or C, H, W) float32, 1 where
    the model generates and 0 where ``image`` (B, C, H, W) is kept; ``eps`` the run's noise.
    After every step the known pixels are set to the image re-noised to the new t."""

    image: np.ndarray
    mask: np.ndarray
    eps: np.ndarray

    def blend(self, x: np.ndarray, t: float) -> np.ndarray:
        out: np.ndarray = np.where(self.mask > 0.5, x, noised(self.image, self.eps, t))
        return out


@dataclass
class StepState:
    """One finished step as a step callback sees it.

    step: 0-based index of the step just taken; num_steps: the steps of this run; t: the time
    the step started from (the value the progress ``callback`` receives); t_next: where it
    ended. ``latents`` (x_t at t) and ``clean_estimate`` (x̂ = x_t + (1 - t) v, with known
    pixels of an inpainting run set to the image) are float32 numpy (B, C, H, W) in about
    [-1, 1], read back from the backend only when asked for.
    """

    step: int
    num_steps: int
    t: float
    t_next: float
    _read: Callable[[Any], np.ndarray] = field(repr=False)
    _x_t: Any = field(repr=False)
    _v: Any = field(repr=False)
    _x_next: Any = field(repr=False)
    _inpainting: Inpainting | None = field(default=None, repr=False)
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def _host(self, a: Any) -> np.ndarray:
        """A backend array (or a host copy the sampler already made) as float32 numpy."""
        return np.asarray(a if isinstance(a, np.ndarray) else self._read(a), dtype=np.float32)

    @property
    def latents(self) -> np.ndarray:
        if "x_t" not in self._cache:
            self._cache["x_t"] = self._host(self._x_t)
        return self._cache["x_t"]

    @property
    def clean_estimate(self) -> np.ndarray:
        if "x0" not in self._cache:
            x_t = self.latents
            if self._v is not None:
                v = self._host(self._v)
            else:  # a fused Euler step hands back only x_next = x_t + v dt
                dt = np.float32(self.t_next - self.t)
                x_next = self._host(self._x_next)
                v = (x_next - x_t) / dt
            x0 = (x_t + np.float32(1.0 - self.t) * v).astype(np.float32)
            if self._inpainting is not None:
                x0 = np.where(self._inpainting.mask > 0.5, x0, self._inpainting.image)
            self._cache["x0"] = x0
        return self._cache["x0"]


class GenerationInterrupted(DecoError):
    """A step callback returned `STOP` or the cancel event was set; the run ended early.

    ``output`` is the partial `GenerationOutput` (its images the clean estimate of the last
    step taken, ``stopped_after`` the steps done); ``latents`` the latent after that step.
    """

    def __init__(self, steps_done: int, num_steps: int, latents: np.ndarray,
                 clean_estimate: np.ndarray) -> None:
        super().__init__(
            f"generation stopped after step {steps_done} of {num_steps} (a step callback "
            "returned STOP or the cancel event was set); the partial result is on .output, or "
            "pass return_partial=True to get it returned"
        )
        self.steps_done = steps_done
        self.num_steps = num_steps
        self.latents = latents
        self.clean_estimate = clean_estimate
        self.output: Any = None


class StepHook:
    """The sampler's after-step hook of one generation: ``hook(i, x_t, v, x_next) -> x_next``.

    ``v`` is the slope the solver took at (x_t, t_i), or None for a fused step. Blends the
    known pixels of an inpainting run, shows the step to ``on_step``, and raises
    `GenerationInterrupted` when it returns `STOP` or ``cancel`` is set (after the last step
    the run is complete and returns as usual).
    """

    def __init__(self, backend: Any, grid: np.ndarray, *,
                 on_step: Callable[[StepState], Any] | None = None,
                 cancel: Cancellable | None = None,
                 inpainting: Inpainting | None = None) -> None:
        self.backend = backend
        self.grid = np.asarray(grid, dtype=np.float32)
        self.on_step = on_step
        self.cancel = cancel
        self.inpainting = inpainting

    def __call__(self, i: int, x_t: Any, v: Any, x_next: Any) -> Any:
        n = int(self.grid.size - 1)
        if self.inpainting is not None:
            blended = self.inpainting.blend(
                np.asarray(self.backend.to_numpy(x_next), dtype=np.float32), self.grid[i + 1])
            x_next = self.backend.from_numpy(blended)
        state = StepState(i, n, float(self.grid[i]), float(self.grid[i + 1]),
                          self.backend.to_numpy, x_t, v, x_next, self.inpainting)
        stop = self.on_step is not None and self.on_step(state) is STOP
        if self.cancel is not None and self.cancel.is_set():
            stop = True
        if stop and i + 1 < n:
            raise GenerationInterrupted(
                i + 1, n, np.array(self.backend.to_numpy(x_next), dtype=np.float32),
                state.clean_estimate)
        return x_next


class GenerationTask:
    """A generation running in a worker thread, the form a GUI application holds: it stays
    responsive, shows ``latest`` (the last `StepState`) as a preview and calls ``cancel()``
    from its own thread. ``future`` is a `concurrent.futures.Future`, so asyncio code awaits
    ``asyncio.wrap_future(task.future)``.

    Made by ``pipe.submit(...)`` with ``generate``'s arguments; ``result()`` returns the
    `GenerationOutput` or raises what ``generate`` raised (`GenerationInterrupted` after a
    cancel, unless ``return_partial=True`` was passed).
    """

    def __init__(self, generate: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        import threading
        from concurrent.futures import Future

        if "cancel" in kwargs:
            raise ValueError("a submitted generation has its own cancel(); do not pass cancel=")
        self._event = threading.Event()
        self._user_on_step: Callable[[StepState], Any] | None = kwargs.pop("on_step", None)
        self.latest: StepState | None = None
        self.future: Future[Any] = Future()
        kwargs.update(on_step=self._on_step, cancel=self._event)
        self._thread = threading.Thread(target=self._run, args=(generate, args, kwargs),
                                        name="deco-generation", daemon=True)
        self._thread.start()

    def _on_step(self, state: StepState) -> Any:
        self.latest = state
        return self._user_on_step(state) if self._user_on_step is not None else None

    def _run(self, generate: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(generate(*args, **kwargs))
        except BaseException as exc:  # handed to whoever waits on the result
            self.future.set_exception(exc)

    def cancel(self) -> None:
        """Ask the generation to stop after the step it is in (safe from any thread)."""
        self._event.set()

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)
