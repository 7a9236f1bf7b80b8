"""The sampler on a guidance-distilled backend: one conditional pass per evaluation, fed w
where the plan guides and 1 elsewhere, giving the CFG sampler's images.

The analytic Gaussian-flow velocity is affine in the class mean, so the guided velocity
v_u + w (v_c - v_u) is the velocity of the mean mu_u + w (mu_c - mu_u): a backend that takes
w as an input and uses that mean is an exactly distilled model of the CFG one.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.backend import takes_guidance
from runtimes.sampler import SamplerConfig, distilled_guidance, make_plan, sample
from runtimes.sharing import SharingSchedule
from tests.helpers import GaussianFlowBackend, SplitGaussianFlowBackend


class DistilledGaussianBackend(GaussianFlowBackend):
    takes_guidance = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fed: list[np.ndarray] = []

    def dit_hidden(self, x_t, t, y, guidance):
        self.fed.append(np.array(guidance))
        hidden = super().dit_hidden(x_t, t, y)
        uncond = super().dit_hidden(x_t, t, np.full_like(y, self.num_classes))
        self.calls[-2:] = [("dit", len(y))]
        w = np.asarray(guidance, np.float32)[:, None, None]
        mixed = uncond + (hidden - uncond) * w
        mixed[..., -2:] = hidden[..., -2:]
        return mixed.astype(np.float32)

    def dit(self, x_t, t, y, guidance):
        cond = self.refresh_condition(self.dit_hidden(x_t, t, y, guidance), t)
        self.calls[-2:] = [("dit", len(y))]
        return cond


@pytest.mark.parametrize("solver,steps", [("euler", 20), ("heun", 8), ("ab2", 12)])
def test_one_pass_per_evaluation_gives_the_cfg_sampler_s_images(solver, steps):
    config = SamplerConfig(solver=solver, num_steps=steps, guidance=3.0,
                           guidance_interval=(0.1, 1.0))
    noise = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    labels = [0, 2]
    teacher = GaussianFlowBackend()
    expected = sample(teacher, noise, labels, config, null_class=3)
    student = DistilledGaussianBackend()
    assert takes_guidance(student) and not takes_guidance(teacher)
    got = sample(student, noise, labels, config, null_class=3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    # Batch B everywhere: no unconditional half, where the teacher ran 2B when guided.
    assert set(student.batches("dit")) == {2} and set(student.batches("decoder")) == {2}
    assert 4 in teacher.batches("decoder")
    # w inside the interval, 1 outside it (the first steps of (0.1, 1]).
    plan = make_plan(config)
    fed = [float(f[0]) for f in student.fed]
    assert fed == [3.0 if ev.guided else 1.0 for ev in plan.evaluations]
    assert fed[0] == 1.0 and 3.0 in fed


def test_guidance_one_and_sharing_feed_w_of_the_dit_step():
    noise = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    unguided = DistilledGaussianBackend()
    sample(unguided, noise, [1], SamplerConfig(num_steps=6, guidance=1.0), null_class=3)
    assert all(float(f[0]) == 1.0 for f in unguided.fed)
    config = SamplerConfig(num_steps=10, guidance=4.0, guidance_interval=(0.1, 1.0))
    shared = DistilledGaussianBackend()
    schedule = SharingSchedule(dit_steps=(0, 2, 4, 6, 8), num_steps=10)
    sample(shared, noise, [1], config, null_class=3, sharing=schedule)
    plan = make_plan(config, schedule)
    expected = [g for k, g in enumerate(distilled_guidance(plan, 1)) if plan.run_dit[k]]
    assert [float(f[0]) for f in shared.fed] == [float(g[0]) for g in expected]
    assert set(shared.batches("decoder")) == {1}


class DistilledSplitBackend(DistilledGaussianBackend, SplitGaussianFlowBackend):
    """The distilled Gaussian backend with the split decoder."""


def _counted(backend) -> dict[str, int]:
    """The calls and rows the backend saw, in `SamplingPlan.cost`'s keys."""
    decoders = backend.batches("decoder") + backend.batches("decoder_pixel")
    counted = {"dit_calls": len(backend.batches("dit")), "dit_samples": sum(backend.batches("dit")),
               "decoder_calls": len(decoders), "decoder_samples": sum(decoders)}
    if backend.batches("decoder_cond"):
        counted["decoder_cond_samples"] = sum(backend.batches("decoder_cond"))
    return counted


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("solver,sharing", [("euler", None), ("heun", None),
                                            ("euler", (0, 3, 6, 8))])
def test_the_cost_counts_the_rows_each_graph_ran(distilled, solver, sharing):
    """`SamplingPlan.cost` is what the backend ran: B rows per call for a distilled model (no
    unconditional half), 2B where the teacher guides."""
    config = SamplerConfig(solver=solver, num_steps=10, guidance=3.0,
                           guidance_interval=(0.3, 1.0))
    schedule = None if sharing is None else SharingSchedule(dit_steps=sharing, num_steps=10)
    backend = DistilledSplitBackend() if distilled else SplitGaussianFlowBackend()
    noise = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    sample(backend, noise, [0, 1], config, null_class=3, sharing=schedule)
    plan = make_plan(config, schedule)
    cost = plan.cost(2, decoder_split=True, distilled=distilled)
    assert {k: getattr(cost, k) for k in _counted(backend)} == _counted(backend)
    assert (cost.decoder_cond_samples is not None) == (sharing is not None)
    if distilled:
        assert cost.dit_samples == 2 * cost.dit_calls
        assert cost.decoder_samples == 2 * cost.evaluations
    else:
        assert cost.decoder_samples > 2 * cost.evaluations  # guided steps ran 2B


class DistilledTextBackend:
    """numpy text-to-image backend that takes w: tokens 2 * text + 1, the DiT their mean + w t."""

    takes_guidance = True
    supports_text_embedding = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def embed_text(self, text):
        self.calls.append(("embed_text", len(text)))
        return text * 2.0 + 1.0

    def dit(self, x_t, t, tokens, guidance):
        self.calls.append(("dit", len(tokens)))
        pooled = tokens.mean(axis=(1, 2)) + guidance * t
        return np.broadcast_to(pooled[:, None, None], (len(x_t), 4, 2)).astype(np.float32)

    def decoder(self, x_t, cond):
        self.calls.append(("decoder", len(x_t)))
        return (cond.mean(axis=(1, 2))[:, None, None, None] - x_t).astype(np.float32)

    def from_numpy(self, a):
        return np.array(a, copy=True)

    def to_numpy(self, a):
        return np.asarray(a)

    def concat(self, arrays):
        return np.concatenate(arrays)


def test_a_distilled_text_model_embeds_only_the_prompts():
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    text = rng.standard_normal((2, 5, 3)).astype(np.float32)
    negative = rng.standard_normal((2, 5, 3)).astype(np.float32)
    config = SamplerConfig(solver="ab2", num_steps=5, guidance=4.0)
    backend = DistilledTextBackend()
    sample(backend, noise, text, config, uncond=negative)
    assert backend.calls[0] == ("embed_text", 2)  # no negative prompt rows
    assert {n for _, n in backend.calls} == {2}
    cost = make_plan(config).cost(2, text_embedding=True, distilled=True)
    assert cost.text_embed_calls == 1 and cost.text_embed_samples == 2
    assert cost.dit_samples == sum(n for k, n in backend.calls if k == "dit")
