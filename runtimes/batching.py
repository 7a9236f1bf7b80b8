"""Step-level batching: many generations in flight, one DiT call and one decoder call per tick.

DeCo's graphs take a per-sample t, so requests that are at different steps, with different
step counts, solvers and guidance, can share one graph call: every tick gathers each in-flight
request's current rows (x_t, its t, and the unconditional rows only where that request's
guidance is active) into one call per graph and image size, and hands each request its rows
back for its own solver update. Requests join and leave between ticks (iteration-level
batching, as LLM servers batch tokens).

How one generation is advanced a step at a time without a second sampler: each request runs
the one sampler (``DeCoPipeline.generate``: its noise from its seed, grid, solver state,
guidance per step, step hook) in a thread of its own, on a *row backend* that answers the
graph calls by handing the arrays to the batcher and blocking until the tick that runs them.
A tick waits until every in-flight request is blocked in a graph call, runs the calls that
come before the decoder (text embedding, DiT, refresh, the decoder's condition) grouped by
method and input shapes, waits again, and then runs the decoder calls the same way. The
sampler's arithmetic between calls is unchanged, so a request's image is the one
``pipe.generate`` gives with the same arguments, to the rounding of the runtime's batched
kernels (a request alone in its group is run unbatched: bit for bit).

The backend itself is only ever called from the thread that ticks, so any backend works,
thread-safe or not. This module is numpy-only and knows no HTTP: an application embeds
`StepBatcher` and calls ``submit``; `deco serve` puts it behind HTTP.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtimes.errors import DecoError
from runtimes.graph_backend import GRAPH_METHODS
from runtimes.graphs import GRAPH_SPECS
from runtimes.steps import StepState

__all__ = ["DECODER_METHODS", "BatchError", "Job", "QueueFull", "StepBatcher", "TickStats"]

# The calls that end a model evaluation (those returning the velocity): a tick runs them after
# every other call of the tick.
DECODER_METHODS = frozenset(m for g in GRAPH_SPECS for m, output in g.calls if output == "v")


class BatchError(DecoError, ValueError):
    """A request the batcher cannot take (more images than a tick holds, or it is closed)."""


class QueueFull(BatchError):
    """The queue of waiting requests is full; ``retry_after`` is a guess in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Call:
    """One graph call of one request, waiting for its tick."""

    job: Job
    method: str
    args: tuple[Any, ...]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def key(self) -> tuple[Any, ...]:
        """Calls with equal keys run as one: the same method on inputs of the same per-row
        shapes and dtypes (so image sizes and CFG-less/CFG rows of a text model group
        correctly)."""
        return (self.method, *((tuple(a.shape[1:]), str(a.dtype)) for a in self.args))

    @property
    def rows(self) -> int:
        return int(self.args[0].shape[0])


@dataclass(frozen=True)
class TickStats:
    """What one tick ran: the requests and images in flight, and per graph call the rows."""

    requests: int
    images: int
    calls: tuple[tuple[str, int], ...]
    seconds: float


class Job:
    """One request in the batcher: ``future`` holds its `GenerationOutput` (or the error
    ``generate`` raised: `GenerationInterrupted` after ``cancel()``); ``latest`` is the last
    finished step's `StepState` (its ``clean_estimate`` is a preview)."""

    def __init__(self, job_id: int, kwargs: dict[str, Any], images: int,
                 on_step: Callable[[StepState], Any] | None) -> None:
        self.id = job_id
        self.kwargs = kwargs
        self.images = images
        self.future: Future[Any] = Future()
        self.latest: StepState | None = None
        self.submitted = time.monotonic()
        self.started: float | None = None
        self._on_step = on_step
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop after the step in flight (safe from any thread); a request still queued never
        starts."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def step_taken(self, state: StepState) -> Any:
        self.latest = state
        return self._on_step(state) if self._on_step is not None else None

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)


class _RowBackend:
    """The backend one request's sampler sees: graph calls go to the batcher and block until
    their tick; everything else (arrays, flags, names) is the real backend's. It offers no
    fused whole-step call (a fused step cannot share a batch with other requests)."""

    supports_step = False
    thread_safe = True

    def __init__(self, backend: Any, batcher: StepBatcher, job: Job) -> None:
        self._backend = backend
        self._batcher = batcher
        self._job = job

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def _row_method(method: str) -> Callable[..., Any]:
    def call(self: _RowBackend, *args: Any) -> Any:
        return self._batcher._wait_for(_Call(self._job, method, args))

    call.__name__ = call.__qualname__ = method
    return call


for _method in GRAPH_METHODS:
    setattr(_RowBackend, _method, _row_method(_method))


class StepBatcher:
    """Runs many ``pipe.generate`` calls at once, one model evaluation of each per tick.

    ``submit(**generate_kwargs)`` queues a request and returns its `Job`; ``tick()`` admits
    queued requests up to ``max_batch`` images in flight and advances every request by one
    evaluation; ``start()`` ticks in a thread of its own until ``close()``. ``max_batch=1``
    runs one request at a time (the request-at-a-time server, same code path). ``on_tick``
    receives each tick's `TickStats`.
    """

    def __init__(self, pipe: Any, *, max_batch: int = 8, max_queue: int = 64,
                 on_tick: Callable[[TickStats], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise BatchError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and "
                             f"{max_queue}")
        self.pipe = pipe
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.on_tick = on_tick
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._active: list[Job] = []
        self._busy = 0  # in-flight requests not blocked in a graph call
        self._pending: list[_Call] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._tick_seconds = 0.0  # a running mean, for Retry-After

    # -- requests -------------------------------------------------------------------------

    def submit(self, *, on_step: Callable[[StepState], Any] | None = None,
               **kwargs: Any) -> Job:
        """Queue ``pipe.generate(**kwargs)``; raises `QueueFull` when ``max_queue`` requests
        are waiting. ``on_step(state)`` runs in the request's thread after each step."""
        images = _images_of(kwargs)
        if images > self.max_batch:
            raise BatchError(f"a request of {images} images does not fit a tick of at most "
                             f"{self.max_batch}; ask for at most {self.max_batch}")
        with self._cv:
            if self._closing:
                raise BatchError("the batcher is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry "
                                "later", self.retry_after())
            job = Job(next(self._ids), kwargs, images, on_step)
            self._queue.append(job)
            self._cv.notify_all()
        return job

    def retry_after(self) -> float:
        """About how long until a queued request could start (seconds, at least 1)."""
        return max(1.0, self._tick_seconds * 10)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    # -- ticking --------------------------------------------------------------------------

    def tick(self) -> TickStats | None:
        """Admit queued requests, then run one evaluation of every request in flight: the
        calls before the decoder (grouped, one call per group) until every request waits on
        its decoder, then the decoder calls. None when nothing was in flight."""
        start = time.perf_counter()
        self._admit()
        with self._cv:
            if not self._active:
                return None
            requests = len(self._active)
            images = sum(j.images for j in self._active)
        ran: list[tuple[str, int]] = []
        while True:
            pending = self._all_waiting()
            early = [c for c in pending if c.method not in DECODER_METHODS]
            if not early:
                break
            ran += self._run(early)
        ran += self._run(pending)
        seconds = time.perf_counter() - start
        self._tick_seconds = 0.9 * self._tick_seconds + 0.1 * seconds if self._tick_seconds \
            else seconds
        stats = TickStats(requests, images, tuple(ran), seconds)
        if self.on_tick is not None:
            self.on_tick(stats)
        return stats

    def _admit(self) -> None:
        with self._cv:
            flight = sum(j.images for j in self._active)
            while self._queue and flight + self._queue[0].images <= self.max_batch:
                job = self._queue.popleft()
                if job.cancelled or not job.future.set_running_or_notify_cancel():
                    if not job.future.done():
                        job.future.cancel()
                    continue
                job.started = time.monotonic()
                flight += job.images
                self._active.append(job)
                self._busy += 1
                threading.Thread(target=self._generate, args=(job,), daemon=True,
                                 name=f"deco-request-{job.id}").start()

    def _generate(self, job: Job) -> None:
        """A request's thread: the one sampler, on a backend whose calls wait for ticks."""
        view = copy.copy(self.pipe)
        view.backend = _RowBackend(self.pipe.backend, self, job)
        try:
            job.future.set_result(view.generate(**job.kwargs, on_step=job.step_taken,
                                                cancel=job._cancel))
        except BaseException as exc:  # handed to whoever waits on the result
            job.future.set_exception(exc)
        finally:
            with self._cv:
                self._active.remove(job)
                self._busy -= 1
                self._cv.notify_all()

    def _wait_for(self, call: _Call) -> Any:
        """In a request's thread: hand a graph call to the next tick and wait for its rows."""
        with self._cv:
            self._pending.append(call)
            self._busy -= 1
            self._cv.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _all_waiting(self) -> list[_Call]:
        """Wait until every request in flight is blocked in a graph call (or finished)."""
        with self._cv:
            while self._busy > 0:
                self._cv.wait()
            return list(self._pending)

    def _run(self, calls: Sequence[_Call]) -> list[tuple[str, int]]:
        """Run ``calls`` as one backend call per group of equal keys; answer each call with its
        rows. Returns (method, rows) per backend call."""
        backend = self.pipe.backend
        groups: dict[tuple[Any, ...], list[_Call]] = {}
        for c in calls:
            groups.setdefault(c.key(), []).append(c)
        ran = []
        for group in groups.values():
            method = group[0].method
            try:
                if len(group) == 1:
                    outs = [getattr(backend, method)(*group[0].args)]
                else:
                    joined = [backend.concat([c.args[i] for c in group])
                              for i in range(len(group[0].args))]
                    out = getattr(backend, method)(*joined)
                    outs, at = [], 0
                    for c in group:
                        outs.append(out[at:at + c.rows])
                        at += c.rows
                for c, o in zip(group, outs, strict=True):
                    c.result = o
            except Exception as exc:
                for c in group:
                    c.error = exc
            ran.append((method, sum(c.rows for c in group)))
        with self._cv:
            answered = set(map(id, calls))
            self._pending = [c for c in self._pending if id(c) not in answered]
            self._busy += len(calls)
        for c in calls:
            c.done.set()
        return ran

    # -- the ticking thread ---------------------------------------------------------------

    def start(self) -> StepBatcher:
        """Tick in a thread of its own until `close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deco-batcher", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            if self.tick() is None:
                with self._cv:
                    if self._closing and not self._queue and not self._active:
                        return
                    if not self._queue:
                        self._cv.wait(timeout=0.5)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with ``drain`` finish every accepted one, else cancel them.
        Returns when the ticking thread has stopped (or after ``timeout`` seconds)."""
        with self._cv:
            self._closing = True
            if not drain:
                for job in [*self._queue, *self._active]:
                    job.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        elif drain:
            while self.tick() is not None or self._queue:
                pass


def _images_of(kwargs: dict[str, Any]) -> int:
    """How many images ``generate(**kwargs)`` makes (its batch), for the in-flight budget."""
    repeat = int(kwargs.get("num_images_per_prompt", 1))
    for key in ("prompt", "class_labels"):
        value = kwargs.get(key)
        if value is not None:
            return repeat * (1 if isinstance(value, (str, int, np.integer)) else len(value))
    for key in ("prompt_embeds", "noise", "latents"):
        if kwargs.get(key) is not None:
            return repeat * int(np.shape(kwargs[key])[0])
    return repeat
