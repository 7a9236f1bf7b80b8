"""The analytic Gaussian-flow model is exact: the sampler tests measure solver error against it."""

from __future__ import annotations

import numpy as np

from tests.helpers import GaussianFlowBackend, patchify, unpatchify


def test_velocity_matches_the_exact_flow():
    be = GaussianFlowBackend()
    rng = np.random.default_rng(1)
    eps = rng.standard_normal((2, 3, 8, 8))
    y = np.array([0, 2])
    mu = be.means[y]
    for t in (0.0, 0.3, 0.9):
        sigma = np.sqrt(t * t * be.s**2 + (1 - t) ** 2)
        x_t = t * mu + sigma * eps
        dsigma = (t * be.s**2 - (1 - t)) / sigma
        v_true = mu + dsigma * eps
        tt = np.full(2, t, np.float32)
        v = be.decoder(x_t.astype(np.float32), be.dit(x_t.astype(np.float32), tt, y))
        np.testing.assert_allclose(v, v_true, atol=2e-6)


def test_patchify_round_trip():
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    assert np.array_equal(unpatchify(patchify(x, 4), 3, 8, 8, 4), x)
