"""The step-level batcher: a request served alone or among others at different steps, sizes,
solvers and guidance gives the image `pipe.generate` gives with the same arguments; requests
join and leave between ticks, a cancelled one frees its slot at the next tick, and a full
queue or an oversized request is refused with one line."""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from runtimes.batching import BatchError, QueueFull, StepBatcher
from runtimes.steps import GenerationInterrupted


def run_until_done(batcher: StepBatcher, jobs, limit: int = 500) -> list:
    stats = []
    for _ in range(limit):
        if all(j.future.done() for j in jobs):
            return stats
        tick = batcher.tick()
        if tick is not None:
            stats.append(tick)
    raise AssertionError("the jobs did not finish")


C2I_CROWD = [
    {"class_labels": [1], "seed": 1, "steps": 12},
    {"class_labels": [2, 5], "seed": 2, "steps": 6, "guidance": 1.0},
    {"class_labels": [7], "seed": 3, "steps": 9, "solver": "heun"},
    {"class_labels": [0], "seed": 4, "steps": 10, "height": 32, "width": 64},
    {"class_labels": [9], "seed": 5, "steps": 7, "solver": "ab2", "guidance": 2.0},
    {"class_labels": [4], "seed": 6, "steps": 11, "height": 32, "width": 64,
     "solver": "unipc"},
    {"class_labels": [8], "seed": 7, "steps": 8, "guidance_interval": (0.5, 1.0)},
]
C2I_TARGET = {"class_labels": [3], "seed": 11, "steps": 8, "guidance": 3.0}


@pytest.fixture(scope="module")
def c2i_pipe(golden_onnx_bundle):
    return runtimes.load(golden_onnx_bundle, backend="onnxruntime")


def served(pipe, target, crowd, join_after: int = 2):
    """The target's image served in a crowd: half the crowd starts first, the target joins
    ``join_after`` ticks later with the rest, so everyone is at a different step."""
    batcher = StepBatcher(pipe, max_batch=16)
    first = [batcher.submit(**kw, output_type="np") for kw in crowd[: len(crowd) // 2]]
    for _ in range(join_after):
        batcher.tick()
    job = batcher.submit(**target, output_type="np")
    rest = [batcher.submit(**kw, output_type="np") for kw in crowd[len(crowd) // 2:]]
    stats = run_until_done(batcher, [*first, job, *rest])
    return job, [*first, *rest], stats


def test_a_request_alone_is_the_offline_image_bit_for_bit(c2i_pipe):
    offline = c2i_pipe.generate(**C2I_TARGET, output_type="np").images
    batcher = StepBatcher(c2i_pipe, max_batch=4)
    job = batcher.submit(**C2I_TARGET, output_type="np")
    stats = run_until_done(batcher, [job])
    np.testing.assert_array_equal(job.result().images, offline)
    assert len([s for s in stats if s.calls]) == C2I_TARGET["steps"]  # an evaluation a tick


def test_a_request_in_a_crowd_at_other_steps_is_the_offline_image(c2i_pipe):
    offline = c2i_pipe.generate(**C2I_TARGET, output_type="np").images
    job, others, stats = served(c2i_pipe, C2I_TARGET, C2I_CROWD)
    assert np.abs(job.result().images - offline).max() < 1e-5
    for kw, other in zip(C2I_CROWD[: 3] + C2I_CROWD[3:], others, strict=True):
        alone = c2i_pipe.generate(**kw, output_type="np").images
        assert np.abs(other.result().images - alone).max() < 1e-5
    # One DiT and one decoder call per size bucket per tick, over many requests at once.
    busiest = max(stats, key=lambda s: s.requests)
    assert busiest.requests == 8 and busiest.images == 9
    decoders = [rows for method, rows in busiest.calls if method == "decoder"]
    assert len(decoders) == 2 and sum(decoders) > 9  # two sizes; CFG rows only where guided
    assert sum(1 for m, _ in busiest.calls if m == "dit") == 2


def test_text_to_image_requests_batch_like_the_offline_sampler(golden_t2i_onnx_bundle,
                                                               golden_t2i):
    pipe = runtimes.load(golden_t2i_onnx_bundle, backend="onnxruntime")
    cond = golden_t2i["cond_text"]
    target = {"prompt_embeds": cond[:1], "seed": 21, "steps": 6}
    crowd = [{"prompt_embeds": cond[i % 2:i % 2 + 1], "seed": 30 + i, "steps": 4 + i,
              "guidance": [4.0, 1.0, 2.5][i % 3], **({"height": 32, "width": 64} if i % 2
                                                     else {})} for i in range(7)]
    offline = pipe.generate(**target, output_type="np").images
    job, _, stats = served(pipe, target, crowd)
    assert np.abs(job.result().images - offline).max() < 1e-5
    assert max(s.requests for s in stats) == 8
    assert any(m == "embed_text" and rows > 2 for s in stats for m, rows in s.calls)


def test_cancel_frees_the_slot_at_the_next_tick(c2i_pipe):
    batcher = StepBatcher(c2i_pipe, max_batch=1)
    long = batcher.submit(class_labels=[1], seed=0, steps=50, output_type="np")
    waiting = batcher.submit(class_labels=[2], seed=0, steps=3, output_type="np")
    batcher.tick()
    assert batcher.in_flight == 1 and batcher.queue_depth == 1
    long.cancel()
    batcher.tick()
    with pytest.raises(GenerationInterrupted):
        long.result(timeout=10)
    run_until_done(batcher, [waiting])
    assert waiting.result().images.shape == (1, 3, 64, 64) and batcher.in_flight == 0


def test_full_queue_and_oversized_requests_are_refused(c2i_pipe):
    batcher = StepBatcher(c2i_pipe, max_batch=2, max_queue=1)
    batcher.submit(class_labels=[1], steps=2)
    with pytest.raises(QueueFull, match="queue is full") as full:
        batcher.submit(class_labels=[1], steps=2)
    assert full.value.retry_after >= 1
    with pytest.raises(BatchError, match="at most 2"):
        batcher.submit(class_labels=[1, 2, 3], steps=2)
