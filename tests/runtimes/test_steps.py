"""Step callbacks: live preview (x_t and the clean estimate), stop, cancel from another thread."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import runtimes
from tests.helpers import GaussianFlowBackend
from tests.runtimes.test_sampler import FusedStepBackend


def _pipe(backend=None, **defaults):
    be = backend or GaussianFlowBackend()
    sd = {"solver": "euler", "steps": 6, "guidance": 1.0, "shift": 1.0, **defaults}
    return runtimes.DeCoPipeline(be, be.model_config(), sd)


def test_the_step_callback_sees_x_t_and_the_clean_estimate():
    pipe = _pipe()
    be = pipe.backend
    states, progress = [], []
    out = pipe.generate([0, 2], seed=4, output_type="np", on_step=states.append,
                        callback=lambda i, n, t: progress.append((i, n, t)))
    assert [s.step for s in states] == list(range(6)) and states[0].num_steps == 6
    assert [(s.step, s.num_steps, s.t) for s in states] == progress  # the old callback, as before
    grid = runtimes.timesteps(6)
    assert np.array_equal([s.t for s in states], grid[:-1].astype(float))
    assert np.array_equal(states[0].latents, runtimes.sample_noise(4, 2, 3, 8, 8))
    for s in states:  # x̂ = x_t + (1 - t) v with the model's velocity at (x_t, t)
        t = np.full(2, s.t, np.float32)
        v = be.decoder(s.latents, be.dit(s.latents, t, [0, 2]))
        assert np.allclose(s.clean_estimate, s.latents + (1 - s.t) * v, atol=1e-6)
    # The last step's estimate is the Euler step to t = 1: the image itself.
    assert np.allclose(states[-1].clean_estimate, out.images, atol=1e-6)
    assert out.stopped_after is None


@pytest.mark.parametrize("backend", [GaussianFlowBackend, FusedStepBackend])
def test_returning_stop_ends_the_run_with_the_partial_result(backend):
    pipe = _pipe(backend())
    seen = []

    def stop_after_three(state):
        seen.append(state.clean_estimate)
        return runtimes.STOP if state.step == 2 else None

    with pytest.raises(runtimes.GenerationInterrupted, match="stopped after step 3 of 6") as err:
        pipe.generate([1], seed=0, output_type="np", on_step=stop_after_three)
    assert isinstance(err.value, runtimes.DecoError)
    partial = err.value.output
    assert partial.stopped_after == 3 and np.array_equal(partial.images, seen[-1])
    assert err.value.latents.shape == (1, 3, 8, 8)
    calls = len(pipe.backend.calls)
    pipe.backend.calls.clear()
    kept = pipe.generate([1], seed=0, output_type="uint8", on_step=stop_after_three,
                         return_partial=True)
    assert kept.stopped_after == 3 and np.array_equal(kept.images, runtimes.to_uint8(seen[-1]))
    assert len(pipe.backend.calls) == calls  # three steps ran, not six
    # Values other than STOP (tqdm's update returns True) never stop a run.
    assert pipe.generate([1], output_type="np", on_step=lambda s: True).stopped_after is None


class InPlaceFusedBackend(FusedStepBackend):
    """A fused step that writes its result into the state it was given, as the CUDA-graph and
    TensorRT backends do."""

    def step(self, x, y, t, dt, guidance):
        x[...] = super().step(x, y, t, dt, guidance)
        return x


def test_the_fused_step_gives_the_same_estimate():
    states = {}
    for kind in (GaussianFlowBackend, FusedStepBackend, InPlaceFusedBackend):
        states[kind] = []
        _pipe(kind()).generate([2], seed=1, output_type="np",
                               on_step=lambda s, out=states[kind]: out.append(s.clean_estimate))
    plain, *fused = states.values()
    for other in fused:
        for a, b in zip(plain, other, strict=True):
            assert np.allclose(a, b, atol=1e-5)


def test_cancel_from_another_thread():
    pipe = _pipe(steps=50)
    started, proceed = threading.Event(), threading.Event()

    def first_step(state):
        if state.step == 0:
            started.set()
            assert proceed.wait(10)

    task = pipe.submit([0, 1], output_type="np", on_step=first_step)
    assert started.wait(10) and not task.done()
    assert task.latest is not None and task.latest.step == 0
    task.cancel()  # the UI thread
    proceed.set()
    with pytest.raises(runtimes.GenerationInterrupted) as err:
        task.result(timeout=10)
    assert err.value.output.stopped_after == 1 and err.value.output.images.shape == (2, 3, 8, 8)


def test_an_event_set_elsewhere_stops_and_asyncio_awaits_a_task():
    pipe = _pipe(steps=50)
    event = threading.Event()
    event.set()
    out = pipe.generate([0], output_type="np", cancel=event, return_partial=True)
    assert out.stopped_after == 1

    async def main():
        task = pipe.submit([0], output_type="np", return_partial=True)
        return await asyncio.wrap_future(task.future)

    assert asyncio.run(main()).stopped_after is None
    with pytest.raises(ValueError, match="has its own cancel"):
        pipe.submit([0], cancel=event)
