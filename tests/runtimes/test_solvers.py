"""The solvers (runtimes/solvers.py) on the analytic Gaussian-flow backend: order, guidance
edges, the coefficient table, evaluation counts."""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.errors import ConfigError
from runtimes.sampler import SamplerConfig, edge_timesteps, make_plan, sample, timesteps
from runtimes.sharing import uniform_schedule
from runtimes.solvers import (
    AB3,
    SOLVER_ALIASES,
    SOLVERS,
    adams_bashforth_table,
    get_solver,
)
from tests.helpers import GaussianFlowBackend

NULL = 3
# Global order as built: the multistep solvers start (and AB3 also ends) at lower order, so
# one first-order step from t = 0 bounds every one-evaluation solver at 2; AB3's own update is
# third order (checked on polynomials below).
ORDERS = {"euler": 1, "heun": 2, "heun_reuse": 2, "ab2": 2, "ab3": 2, "dpm++2m": 2, "unipc": 2}
ONE_PER_STEP = ("euler", "heun_reuse", "ab2", "ab3", "dpm++2m", "unipc")


def _sigma(be: GaussianFlowBackend, t: float) -> float:
    return float(np.sqrt(t * t * be.s**2 + (1 - t) ** 2))


@pytest.fixture(scope="module")
def eps() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 8, 8))


def _slope(errors: list[float], ns: tuple[int, ...]) -> float:
    return float(np.log(errors[0] / errors[-1]) / np.log(ns[-1] / ns[0]))


@pytest.mark.parametrize("solver", sorted(ORDERS))
def test_error_falls_with_the_slope_of_the_order(solver, eps):
    """Inside (0.2, 0.8), away from lambda's infinite ends, from the exact state at 0.2: the
    error against the exact state at 0.8 falls as N^-order."""
    be = GaussianFlowBackend()
    labels = np.array([0, 1])
    mu = be.means[labels]
    t0, t1 = 0.2, 0.8
    x0 = (t0 * mu + _sigma(be, t0) * eps).astype(np.float32)
    exact = t1 * mu + _sigma(be, t1) * eps
    ns = (8, 16, 32, 64)
    errors = []
    for n in ns:
        cfg = SamplerConfig(solver=solver, timesteps=tuple(np.linspace(t0, t1, n + 1)))
        errors.append(float(np.abs(sample(be, x0, labels, cfg, null_class=NULL) - exact).max()))
    assert _slope(errors, ns) > ORDERS[solver] - 0.3, (solver, errors)


def _guided_exact(be: GaussianFlowBackend, eps: np.ndarray, w: float, lo: float) -> np.ndarray:
    """The exact end of the guided flow with guidance w on (lo, 1]: the guided velocity of
    Gaussian classes is the flow of the mean mu_u + w (mu_c - mu_u), so the solution is the
    unguided flow to lo, then the guided one from the state there."""
    mu_c, mu_u = be.means[[0, 1]], be.means[[NULL, NULL]]
    mu_w = mu_u + w * (mu_c - mu_u)
    x_lo = lo * mu_c + _sigma(be, lo) * eps
    return mu_w + be.s * (x_lo - lo * mu_w) / _sigma(be, lo)


@pytest.mark.parametrize("solver", sorted(ORDERS))
def test_guidance_edges_restore_the_order_across_the_guidance_jump(solver, eps):
    """CFG 3 on (0.1, 1] (the c2i release's interval) from t = 0: with a step boundary on 0.1
    and the history restarted there, every solver beats the same solver straddling the jump,
    and the second-order ones keep their slope."""
    be = GaussianFlowBackend()
    exact = _guided_exact(be, eps, 3.0, 0.1)
    ns = (8, 16, 32, 64)
    errors: dict[bool, list[float]] = {False: [], True: []}
    for edges in (False, True):
        for n in ns:
            cfg = SamplerConfig(solver=solver, num_steps=n, guidance=3.0,
                                guidance_interval=(0.1, 1.0), guidance_edges=edges)
            x = sample(be, eps.astype(np.float32), [0, 1], cfg, null_class=NULL)
            errors[edges].append(float(np.abs(x - exact).max()))
    if solver != "euler":
        assert errors[True][2] < errors[False][2], errors
    # lambda's infinite ends slow the data-prediction solvers' approach to their asymptote
    want = {"dpm++2m": 1.25, "unipc": 1.25}.get(solver, ORDERS[solver] - 0.3)
    assert _slope(errors[True], ns) > want, (solver, errors[True])


def test_edge_grid_puts_a_boundary_on_the_edge_and_keeps_the_step_count():
    for n, shift in ((4, 1.0), (8, 1.0), (10, 3.0), (25, 1.0)):
        grid = edge_timesteps(n, shift, (0.1, 1.0))
        assert grid.dtype == np.float32 and grid.size == n + 1
        assert grid[0] == 0 and grid[-1] == 1 and np.all(np.diff(grid) > 0)
        assert np.float32(0.1) in grid
    assert edge_timesteps(8, 1.0, (0.1, 1.0))[1] == np.float32(0.1)  # 1 step below, 7 above
    both = edge_timesteps(10, 1.0, (0.3, 0.6))
    assert np.float32(0.3) in both and np.float32(0.6) in both
    assert np.array_equal(edge_timesteps(12, 3.0, (0.0, 1.0)), timesteps(12, 3.0))
    with pytest.raises(ConfigError, match="at least 2 steps"):
        make_plan(SamplerConfig(num_steps=1, guidance=2.0, guidance_interval=(0.1, 1.0),
                                guidance_edges=True))
    # guidance per step by where the step lies: the bounds' open or closed ends do not matter
    # a given split of the steps between the edges (what a tuned table searches)
    three = edge_timesteps(8, 1.0, (0.1, 1.0), counts=(3, 5))
    assert three[3] == np.float32(0.1) and np.allclose(np.diff(three[:4]), 0.1 / 3)
    assert np.allclose(np.diff(three[3:]), 0.9 / 5)
    assert np.array_equal(edge_timesteps(8, 1.0, (0.1, 1.0), counts=(1, 7)),
                          edge_timesteps(8, 1.0, (0.1, 1.0)))
    for bad in ((0, 8), (2, 5), (1, 2, 5)):
        with pytest.raises(ConfigError, match="at least one step and sum to 8"):
            edge_timesteps(8, 1.0, (0.1, 1.0), counts=bad)
    plans = [make_plan(SamplerConfig(solver="ab2", num_steps=8, guidance=3.0, guidance_bounds=b,
                                     guidance_interval=(0.1, 1.0), guidance_edges=True))
             for b in ("()", "(]", "[]")]
    assert [e.guided for e in plans[0].evaluations] == [False] + [True] * 7
    assert all(p.evaluations == plans[0].evaluations for p in plans)
    assert plans[0].restarts == (True,) + (False,) * 7


def test_table_solver_reproduces_euler_and_ab2(eps):
    noise = eps.astype(np.float32)
    euler = SamplerConfig(num_steps=9, shift=2.0, guidance=3.0, guidance_interval=(0.1, 1.0))
    grid = tuple(float(v) for v in euler.grid())
    table = SamplerConfig(solver="table", timesteps=grid, coefficients=((0.0,) * 9,) * 9,
                          guidance=3.0, guidance_interval=(0.1, 1.0))
    got = sample(GaussianFlowBackend(), noise, [0, 1], table, null_class=NULL)
    assert np.array_equal(got, sample(GaussianFlowBackend(), noise, [0, 1], euler,
                                      null_class=NULL))
    ab2 = SamplerConfig(solver="ab2", num_steps=25, shift=3.0, guidance=4.0,
                        guidance_bounds="()", accumulate_time=True)
    plan = make_plan(ab2)
    rows = np.zeros((25, 25))
    for i, (c_prev, _) in enumerate(plan.coefficients[1:], start=1):
        rows[i, i - 1] = c_prev
    np.testing.assert_allclose(adams_bashforth_table(plan.grid, 2), rows, atol=2e-7)
    table = SamplerConfig(solver="table", timesteps=tuple(float(v) for v in plan.grid),
                          coefficients=tuple(map(tuple, rows)), guidance=4.0,
                          guidance_bounds="()", accumulate_time=True)
    want = sample(GaussianFlowBackend(), noise, [0, 1], ab2, null_class=NULL)
    got = sample(GaussianFlowBackend(), noise, [0, 1], table, null_class=NULL)
    # AB2 rounds its two weights separately to float32; the table's own weight is 1 - c
    # (float64), so they agree to float32 rounding of the weights.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="9 x 9"):
        make_plan(SamplerConfig(solver="table", timesteps=grid, coefficients=((0.0,) * 3,) * 3))
    upper = np.zeros((9, 9))
    upper[2, 5] = 0.1
    with pytest.raises(ConfigError, match="strictly lower"):
        make_plan(SamplerConfig(solver="table", timesteps=grid,
                                coefficients=tuple(map(tuple, upper))))
    with pytest.raises(ConfigError, match="coefficients go with solver 'table'"):
        SamplerConfig(solver="euler", coefficients=((0.0,),))


def test_ab3_weights_integrate_quadratics_exactly():
    """A wrong AB3 coefficient fails here: each step with three nodes integrates any quadratic
    velocity exactly on a non-uniform grid (and AB-k tables likewise for degree k - 1)."""
    grid = timesteps(9, shift=2.5)
    plan = make_plan(SamplerConfig(solver="ab3", num_steps=9, shift=2.5))
    p = np.poly1d([3.0, -2.0, 0.5])
    for i, (terms, own, _) in enumerate(plan.coefficients):
        w = [c for _, c in terms] + [own]
        k = len(w)
        assert k == (1 if i == 0 else 2 if i in (1, 8) else 3)
        assert [j for j, _ in terms] == list(range(i - k + 1, i))
        nodes = [float(grid[i - j]) for j in range(k - 1, -1, -1)]
        q = np.poly1d(p.coeffs[-k:])  # degree k - 1
        mean = (q.integ()(grid[i + 1]) - q.integ()(grid[i])) / (grid[i + 1] - grid[i])
        assert abs(sum(wj * q(tj) for wj, tj in zip(w, nodes, strict=True)) - mean) < 1e-9
    table = adams_bashforth_table(grid, 3)
    for i in range(3, 9):
        nodes = grid[i - 2:i + 1].astype(np.float64)
        w = [*table[i, i - 2:i], 1 - table[i, i - 2:i].sum()]
        mean = (p.integ()(grid[i + 1]) - p.integ()(grid[i])) / (grid[i + 1] - grid[i])
        assert abs(np.dot(w, p(nodes)) - mean) < 1e-9
    assert isinstance(get_solver("adams3"), AB3)


def test_evaluation_counts():
    for solver in ONE_PER_STEP:
        assert make_plan(SamplerConfig(solver=solver, num_steps=7)).num_evaluations == 7
    assert make_plan(SamplerConfig(solver="heun", num_steps=7)).num_evaluations == 13
    # heun_reuse evaluates afresh after a guidance edge (the reused slope is the old field's)
    cfg = SamplerConfig(solver="heun_reuse", num_steps=8, guidance=3.0,
                        guidance_interval=(0.1, 1.0), guidance_edges=True)
    assert make_plan(cfg).num_evaluations == 9
    assert set(SOLVER_ALIASES.values()) <= set(SOLVERS)
    with pytest.raises(ConfigError, match="unknown solver 'rk45'"):
        SamplerConfig(solver="rk45")


@pytest.mark.parametrize("solver", ["ab3", "dpm++2m", "unipc"])
def test_new_solvers_under_cfg_modes_sharing_and_edges(solver, eps):
    noise = eps.astype(np.float32)
    out = {}
    for mode in ("fast", "reference"):
        cfg = SamplerConfig(solver=solver, num_steps=10, guidance=3.0, cfg_mode=mode,
                            guidance_interval=(0.3, 1.0), guidance_edges=True)
        out[mode] = sample(GaussianFlowBackend(), noise, [0, 2], cfg, null_class=NULL)
    np.testing.assert_allclose(out["fast"], out["reference"], atol=1e-5)
    cfg = SamplerConfig(solver=solver, num_steps=10, guidance=2.0, guidance_interval=(0.3, 1.0),
                        accumulate_time=True, shift=3.0)
    plain = sample(GaussianFlowBackend(), noise, [0, 2], cfg, null_class=NULL)
    be = GaussianFlowBackend()
    fresh = sample(be, noise, [0, 2], cfg, null_class=NULL,
                   sharing=uniform_schedule(10, ratio=0.5, mode="fresh_t"))
    np.testing.assert_allclose(fresh, plain, atol=1e-5)  # the analytic h is exact to share
    assert len(be.batches("dit")) == 5
