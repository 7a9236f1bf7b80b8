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
from tests.helpers import GaussianFlowBackend


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
