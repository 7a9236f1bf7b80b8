"""The ODE solvers of the one sampler: one small class per solver and one registry.

A solver says which model evaluations a step makes (`evaluation_points`), what it computes from
the time grid before the first step (`prepare`: host-side float64/float32 coefficients, so the
step loop never does scalar work the plan could have done), and how a step combines its
evaluations into the next state (`step`). The sampler owns the loop, classifier-free guidance,
DiT sharing and the fused step; a solver only ever sees ``evaluate(x) -> v``, the guided
velocity at the state it is given (the time is the plan's, in evaluation order), and backend
arrays that support ``+``, ``-`` and multiplication by a Python float.

Conventions: t = 0 noise, t = 1 data, x_t = t x + (1 - t) eps, v = x - eps. Derived quantities
at (x_t, t): the clean-image estimate (data prediction) x_hat = x_t + (1 - t) v, and for the
DPM-Solver family alpha_t = t, sigma_t = 1 - t, lambda_t = log(t / (1 - t)), which is -inf at
t = 0 and +inf at t = 1: a multistep solver's first step and last step are first order there.

``restarts[i]`` (from the plan) marks the steps after which the velocity field may jump (the
edges of the guidance interval on a grid that places a step boundary on them): a multistep
solver drops its history there instead of extrapolating across the jump.

Adding a solver is one class here and one line in `SOLVER_CLASSES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from runtimes.errors import ConfigError

__all__ = [
    "AB2",
    "AB3",
    "SOLVERS",
    "SOLVER_ALIASES",
    "SOLVER_CLASSES",
    "DPMSolverPP2M",
    "Euler",
    "Heun",
    "HeunReuse",
    "Solver",
    "Table",
    "UniPC",
    "adams_bashforth_table",
    "get_solver",
]

Evaluate = Callable[[Any], Any]


class Solver:
    """One ODE solver. Subclasses set ``name`` (and older spellings in ``aliases``), the
    guidance-interval ends the reference used with it (``default_bounds``), and override the
    methods below; a solver holds no per-sample state (`start` makes it)."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    default_bounds: ClassVar[str] = "(]"
    order: ClassVar[int] = 1
    # Whether the backend's fused whole-step ``step(x, y, t, dt, w)`` computes this solver's
    # step (only Euler: one evaluation, x + v dt).
    fusable: ClassVar[bool] = False

    def evaluation_points(self, num_steps: int,
                          restarts: Sequence[bool] | None = None) -> list[tuple[int, int]]:
        """(step, grid index) of each model evaluation, in the order they run; the step says
        whose guidance flag applies (the reference decides guidance once per step)."""
        return [(i, i) for i in range(num_steps)]

    def num_evaluations(self, num_steps: int, restarts: Sequence[bool] | None = None) -> int:
        """Model evaluations (NFE per CFG branch) for ``num_steps`` steps."""
        return len(self.evaluation_points(num_steps, restarts))

    def prepare(
        self, grid: np.ndarray, restarts: Sequence[bool], coefficients: Any = None
    ) -> tuple[Any, ...]:
        """Per-step constants computed from the float32 grid (N + 1 times) on the host."""
        return ()

    def start(self) -> dict[str, Any]:
        """A fresh per-sample state (the history of a multistep solver)."""
        return {}

    def step(self, i: int, x: Any, dt: float, coeffs: tuple[Any, ...], state: dict[str, Any],
             evaluate: Evaluate) -> Any:
        """Advance ``x`` over step i (dt = t_{i+1} - t_i); ``coeffs`` is `prepare`'s output."""
        raise NotImplementedError


class Euler(Solver):
    """x += v dt: one evaluation per step, first order."""

    name = "euler"
    fusable = True

    def step(self, i: int, x: Any, dt: float, coeffs: tuple[Any, ...], state: dict[str, Any],
             evaluate: Evaluate) -> Any:
        v = evaluate(x)
        return x + v * dt


class Heun(Solver):
    """Heun (second order, two evaluations per step), the last step Euler as in the reference
    HeunSampler with exact_henu=True."""

    name = "heun"
    aliases: ClassVar[tuple[str, ...]] = ("heun_exact", "heun2")
    order = 2
    reuse: ClassVar[bool] = False

    def _fresh(self, i: int, restarts: Sequence[bool] | None) -> bool:
        """Whether step i evaluates at its start (reuse mode takes the last corrector's
        evaluation, except at the first step and after a guidance edge, where the field
        changed)."""
        return i == 0 or not self.reuse or bool(restarts is not None and restarts[i - 1])

    def evaluation_points(self, num_steps: int,
                          restarts: Sequence[bool] | None = None) -> list[tuple[int, int]]:
        points: list[tuple[int, int]] = []
        for i in range(num_steps):
            if self._fresh(i, restarts):
                points.append((i, i))
            if i < num_steps - 1:
                points.append((i, i + 1))
        return points

    def prepare(self, grid: np.ndarray, restarts: Sequence[bool],
                coefficients: Any = None) -> tuple[Any, ...]:
        """Per step: (whether it evaluates at its start, whether it has a corrector: every
        step but the last)."""
        n = int(grid.size) - 1
        return tuple((self._fresh(i, restarts), i < n - 1) for i in range(n))

    def step(self, i: int, x: Any, dt: float, coeffs: tuple[Any, ...], state: dict[str, Any],
             evaluate: Evaluate) -> Any:
        fresh, corrector = coeffs[i]
        v = evaluate(x) if fresh else state["v_prev"]
        if corrector:
            x_hat = x + v * dt
            v_hat = evaluate(x_hat)
            state["v_prev"] = v_hat
            return x + ((v + v_hat) * 0.5) * dt
        return x + v * dt


class HeunReuse(Heun):
    """The reference default exact_henu=False: the corrector's evaluation at (x_hat, t_next) is
    reused as the next step's slope, one evaluation per step."""

    name = "heun_reuse"
    aliases = ("heun_cheap",)
    reuse = True


def _lagrange_weights(nodes: Sequence[float], start: float, end: float) -> list[float]:
    """Weights w_j with sum_j w_j f(nodes[j]) = (1 / (end - start)) * integral of the
    interpolating polynomial of f over [start, end] (float64; exact for degree < len(nodes))."""
    h = end - start
    weights = []
    for j, tj in enumerate(nodes):
        others = [tk for k, tk in enumerate(nodes) if k != j]
        poly = np.poly1d([1.0])
        for tk in others:
            poly = poly * np.poly1d([1.0, -tk]) / (tj - tk)
        antider = poly.integ()
        weights.append(float((antider(end) - antider(start)) / h))
    return weights


def _history_orders(n: int, restarts: Sequence[bool], max_order: int) -> list[int]:
    """The multistep order each step may use: it grows by one per step since the last restart
    (the start or a guidance edge), up to ``max_order``."""
    orders, since = [], 0
    for i in range(n):
        if i > 0 and restarts[i - 1]:
            since = 0
        orders.append(min(max_order, since + 1))
        since += 1
    return orders


def adams_bashforth_table(grid: np.ndarray, order: int,
                          restarts: Sequence[bool] | None = None) -> np.ndarray:
    """The (N, N) lower-triangular table of variable-step Adams-Bashforth of ``order`` on
    ``grid`` (the coefficient-table form: c[i][j] weights v_j, j < i; v_i gets 1 - sum), the
    order ramping up from the first step and after each restart."""
    n = int(grid.size) - 1
    restarts = restarts if restarts is not None else [False] * n
    table = np.zeros((n, n))
    g = np.asarray(grid, np.float64)
    for i, k in enumerate(_history_orders(n, restarts, order)):
        if k > 1:
            nodes = [g[i - j] for j in range(k - 1, -1, -1)]  # oldest first
            w = _lagrange_weights(nodes, g[i], g[i + 1])
            table[i, i - k + 1:i] = w[:-1]
    return table


class AB2(Solver):
    """Two-step Adams-Bashforth with variable step, the first step Euler (the reference
    AdamLMSampler at order 2): v = c_prev v_{i-1} + c_cur v_i."""

    name = "ab2"
    aliases = ("adams2", "adams_bashforth2", "adamlms")
    default_bounds = "()"
    order = 2

    def prepare(self, grid: np.ndarray, restarts: Sequence[bool],
                coefficients: Any = None) -> tuple[Any, ...]:
        """(c_prev, c_cur) per step: the variable-step AB2 weights (-h / 2h', 1 + h / 2h'),
        computed in float32 with the reference's Lagrange pre-integration formula. Step 0 (and
        a step after a restart) is Euler: (0, 1)."""
        coeffs = [(0.0, 1.0)]
        half = np.float32(0.5)
        for i in range(1, grid.size - 1):
            if restarts[i - 1]:
                coeffs.append((0.0, 1.0))
                continue
            t1, t2, s, e = grid[i - 1], grid[i], grid[i], grid[i + 1]
            int1 = half / (t1 - t2) * ((e - t2) * (e - t2) - (s - t2) * (s - t2))
            int2 = half / (t2 - t1) * ((e - t1) * (e - t1) - (s - t1) * (s - t1))
            total = np.float32(int1 + int2)
            coeffs.append((float(np.float32(int1 / total)), float(np.float32(int2 / total))))
        return tuple(coeffs)

    def step(self, i: int, x: Any, dt: float, coeffs: tuple[Any, ...], state: dict[str, Any],
             evaluate: Evaluate) -> Any:
        v_i = evaluate(x)
        c_prev, c_cur = coeffs[i]
        v_prev = state.get("v_prev")
        v = v_i if (v_prev is None or c_prev == 0.0) else v_prev * c_prev + v_i * c_cur
        state["v_prev"] = v_i
        return x + v * dt


class _WeightedHistory(Solver):
    """A one-evaluation-per-step solver whose step is x += dt (sum_j w_ij v_j + own_i v_i):
    `prepare` returns per step ((j, w_ij) for earlier steps j, own_i), and the velocities no
    later step weights are dropped as the loop goes."""

    def _rows(self, grid: np.ndarray, restarts: Sequence[bool],
              coefficients: Any) -> list[tuple[tuple[tuple[int, float], ...], float]]:
        raise NotImplementedError

    def prepare(self, grid: np.ndarray, restarts: Sequence[bool],
                coefficients: Any = None) -> tuple[Any, ...]:
        rows = self._rows(grid, restarts, coefficients)
        n = len(rows)
        # the oldest velocity any step after i still weights
        oldest = [min((j for later in rows[i + 1:] for j, _ in later[0]), default=i + 1)
                  for i in range(n)]
        return tuple((terms, own, oldest[i]) for i, (terms, own) in enumerate(rows))

    def start(self) -> dict[str, Any]:
        return {"history": {}}

    def step(self, i: int, x: Any, dt: float, coeffs: tuple[Any, ...], state: dict[str, Any],
             evaluate: Evaluate) -> Any:
        v_i = evaluate(x)
        history: dict[int, Any] = state["history"]
        history[i] = v_i
        terms, own, oldest = coeffs[i]
        v = v_i
        if terms:
            v = history[terms[0][0]] * terms[0][1]
            for j, w in terms[1:]:
                v = v + history[j] * w
            v = v + v_i * own
        for j in [j for j in history if j < oldest]:
            del history[j]
        return x + v * dt


class Table(_WeightedHistory):
    """The coefficient-table solver: N time deltas (the grid) and a lower-triangular table c.
    Step i evaluates v_i once, then v_bar = sum_{j<i} c[i][j] v_j + (1 - sum_j c[i][j]) v_i and
    x += dt_i v_bar. c = 0 is Euler (bit for bit); `adams_bashforth_table` gives AB-k; a tuned
    table comes from ``deco calibrate``. Rows are used as given (float64 host values)."""

    name = "table"
    aliases = ("coefficients",)
    order = 1

    def _rows(self, grid: np.ndarray, restarts: Sequence[bool],
              coefficients: Any) -> list[tuple[tuple[tuple[int, float], ...], float]]:
        n = int(grid.size) - 1
        if coefficients is None:
            raise ConfigError("solver 'table' needs coefficients (an N x N lower-triangular "
                              "table; all zeros is Euler)")
        c = np.asarray(coefficients, np.float64)
        if c.shape != (n, n):
            raise ConfigError(f"solver 'table': the coefficient table must be {n} x {n} for "
                              f"{n} steps, got {c.shape}")
        if np.any(np.triu(c) != 0):
            raise ConfigError("solver 'table': the coefficient table must be strictly lower "
                              "triangular (row i weights the velocities of steps before i)")
        rows = []
        for i in range(n):
            terms = tuple((j, float(c[i, j])) for j in range(i) if c[i, j] != 0.0)
            rows.append((terms, 1.0 - sum(w for _, w in terms)))
        return rows


class AB3(_WeightedHistory):
    """Three-step Adams-Bashforth with variable step (weights from the Lagrange interpolant
    of the last three velocities integrated over the step), Euler at the first step and AB2
    at the second and at the last (lower order at both ends, as multistep solvers for
    diffusion do: the final step to t = 1 is the least smooth)."""

    name = "ab3"
    aliases = ("adams3",)
    order = 3

    def _rows(self, grid: np.ndarray, restarts: Sequence[bool],
              coefficients: Any) -> list[tuple[tuple[tuple[int, float], ...], float]]:
        n = int(grid.size) - 1
        g = np.asarray(grid, np.float64)
        rows = []
        for i, k in enumerate(_history_orders(n, restarts, 3)):
            if i == n - 1:
                k = min(k, 2)
            nodes = [g[i - j] for j in range(k - 1, -1, -1)]  # oldest first
            w = _lagrange_weights(nodes, g[i], g[i + 1])
            rows.append((tuple((i - k + 1 + j, w[j]) for j in range(k - 1)), w[-1]))
        return rows


def _lambda(t: float) -> float:
    """log-SNR of the flow path, log(t / (1 - t)), with its infinite ends."""
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t / (1.0 - t))


def _data_update(s: float, t: float) -> tuple[float, float]:
    """(a, b) of the first-order data-prediction step x_t = a x_s + b D: a = sigma_t / sigma_s,
    b = -alpha_t (e^{-h} - 1). With D = x_hat_s it is exactly an Euler step."""
    return (1.0 - t) / (1.0 - s), t - s * (1.0 - t) / (1.0 - s)


class DPMSolverPP2M(Solver):
    """Flow DPM-Solver++ 2M (multistep, data prediction; diffusers' "midpoint" form with
    sigma = 1 - t): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, with
    D = x_hat_s + (x_hat_s - x_hat_prev) / (2 r), r = h_prev / h. First order at the first step
    (lambda = -inf at t = 0: the update is Euler), after a restart, and at the last step
    (t = 1: x = x_hat)."""

    name = "dpm++2m"
    aliases = ("dpmpp_2m", "dpm_solver++_2m", "dpmsolver++")
    order = 2

    def prepare(self, grid: np.ndarray, restarts: Sequence[bool],
                coefficients: Any = None) -> tuple[Any, ...]:
        n = int(grid.size) - 1
        g = [float(v) for v in grid]
        rows = []
        orders = _history_orders(n, restarts, 2)
        for i in range(n):
            s, t = g[i], g[i + 1]
            a, b = _data_update(s, t)
            k = orders[i]
            if k == 2 and (g[i - 1] <= 0.0 or t >= 1.0):
                k = 1
            if k == 1:
                rows.append((a, b, 0.0, 1.0 - s))
                continue
            h = _lambda(t) - _lambda(s)
            r = (_lambda(s) - _lambda(g[i - 1])) / h
            d = 0.5 / r
            # x_t = a x_s + b ((1 + d) x_hat_s - d x_hat_prev)
            rows.append((a, b * (1.0 + d), -b * d, 1.0 - s))
        return tuple(rows)

    def start(self) -> dict[str, Any]:
        return {"m_prev": None}

    def step(self, i: int, x: Any, dt: float, coeffs: tuple[Any, ...], state: dict[str, Any],
             evaluate: Evaluate) -> Any:
        a, b_cur, b_prev, one_minus_t = coeffs[i]
        v = evaluate(x)
        m = x + v * one_minus_t
        out = x * a + m * b_cur
        if b_prev != 0.0:
            out = out + state["m_prev"] * b_prev
        state["m_prev"] = m
        return out


def _unipc_b(hh: float, order: int) -> list[float]:
    """UniPC's right-hand side b (``order`` values) for bh2 (B(h) = expm1(hh)) at hh = -h in
    data prediction, following diffusers' loop; hh is finite (an order-2 step never starts
    at t = 0 or ends at t = 1)."""
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1.0
    phis, fact = [], 1
    for i in range(1, order + 1):
        phis.append(phi * fact / b_h)
        fact *= i + 1
        phi = phi / hh - 1.0 / fact
    return phis


class UniPC(Solver):
    """Flow UniPC, bh2, order 2 (diffusers' UniPCMultistepScheduler with predict_x0, sigma =
    1 - t): a UniP-2 predictor in data prediction and a UniC corrector that reuses the model
    evaluation at the predicted state (the next step's evaluation), so one evaluation per step.
    The predictor is first order at the first step, after a restart and at the last step
    (lower_order_final; at t = 1 it returns x_hat), and no corrector follows the last step."""

    name = "unipc"
    aliases = ("unipc_bh2", "unipc2")
    order = 2

    def prepare(self, grid: np.ndarray, restarts: Sequence[bool],
                coefficients: Any = None) -> tuple[Any, ...]:
        """Per step i: the corrector of the state reached by step i - 1 (applied before step
        i's predictor) and step i's predictor, each as weights of x_{i-1} or x_i and of the
        data predictions m_{i-2}, m_{i-1}, m_i."""
        n = int(grid.size) - 1
        g = [float(v) for v in grid]
        lam = [_lambda(v) for v in g]
        orders = _history_orders(n, restarts, 2)
        # lower_order_final, and no history point at t = 0 (lambda = -inf)
        pred_orders = [1 if (i == n - 1 or (k == 2 and g[i - 1] <= 0.0)) else k
                       for i, k in enumerate(orders)]
        rows = []
        for i in range(n):
            s, t = g[i], g[i + 1]
            a, b = _data_update(s, t)  # x_t_ = a x_s + b m_s (b = -alpha_t h_phi_1)
            # predictor (from x_i, m_i, m_{i-1})
            p_m_prev = 0.0
            p_m_cur = b
            if pred_orders[i] == 2:
                h = lam[i + 1] - lam[i]
                rk = (lam[i - 1] - lam[i]) / h
                b_h = math.expm1(-h)
                # pred_res = rhos_p * D1 with D1 = (m_prev - m_cur) / rk, rhos_p = 0.5 (order 2)
                coef = -t * b_h * 0.5 / rk
                p_m_prev += coef
                p_m_cur -= coef
            predictor = (a, p_m_cur, p_m_prev)
            # corrector of x_{i+1}: applied at step i + 1 after m_{i+1} is known, from x_i
            corrector = None
            if i < n - 1 and not restarts[i]:
                order = pred_orders[i]
                hh = -(lam[i + 1] - lam[i])
                b_h = -1.0 if math.isinf(hh) else math.expm1(hh)  # the limit from t = 0
                c_m_prev = 0.0
                if order == 1:
                    rhos = [0.5]
                else:
                    r_c = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
                    mat = np.array([[1.0, 1.0], [r_c, 1.0]])
                    rhos = [float(v) for v in np.linalg.solve(mat, np.array(_unipc_b(hh, 2)))]
                # x = a x_i + b m_i - alpha_t B_h (sum rhos[:-1] D1s + rhos[-1] (m_t - m_i))
                scale = -t * b_h
                c_m_cur = b - scale * rhos[-1]
                c_m_next = scale * rhos[-1]
                if order == 2:
                    c_m_prev = scale * rhos[0] / r_c
                    c_m_cur -= scale * rhos[0] / r_c
                corrector = (a, c_m_cur, c_m_prev, c_m_next)
            rows.append((predictor, corrector, 1.0 - s))
        return tuple(rows)

    def start(self) -> dict[str, Any]:
        return {"m": [], "x_last": None}

    def step(self, i: int, x: Any, dt: float, coeffs: tuple[Any, ...], state: dict[str, Any],
             evaluate: Evaluate) -> Any:
        predictor, _, one_minus_t = coeffs[i]
        v = evaluate(x)
        m_new = x + v * one_minus_t
        ms: list[Any] = state["m"]
        if i > 0 and coeffs[i - 1][1] is not None:
            a, c_cur, c_prev, c_next = coeffs[i - 1][1]
            x = state["x_last"] * a + ms[-1] * c_cur + m_new * c_next
            if c_prev != 0.0:
                x = x + ms[-2] * c_prev
        ms.append(m_new)
        del ms[:-2]
        state["x_last"] = x
        a, p_cur, p_prev = predictor
        out = x * a + m_new * p_cur
        if p_prev != 0.0:
            out = out + ms[-2] * p_prev
        return out


# Every solver, by name; one line per solver.
SOLVER_CLASSES: dict[str, type[Solver]] = {
    cls.name: cls for cls in (Euler, Heun, HeunReuse, AB2, AB3, DPMSolverPP2M, UniPC, Table)
}
SOLVERS: tuple[str, ...] = tuple(SOLVER_CLASSES)
# Other spellings, still accepted (the CLI lists only SOLVERS).
SOLVER_ALIASES: dict[str, str] = {
    alias: cls.name for cls in SOLVER_CLASSES.values() for alias in cls.aliases
}


def get_solver(name: str) -> Solver:
    """The solver called ``name`` (or one of its aliases); ConfigError lists the names."""
    key = SOLVER_ALIASES.get(name, name)
    cls = SOLVER_CLASSES.get(key)
    if cls is None:
        raise ConfigError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}")
    return cls()
