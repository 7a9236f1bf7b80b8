"""The one sampler: time grids, solvers, classifier-free guidance and DiT sharing.

It drives any `runtimes.backend.Backend` and knows nothing about the runtime behind it (the
diffusers model/scheduler split applied to DeCo's two graphs). Conventions follow the reference
DeCo code: **t = 0 is pure noise, t = 1 is data**, the velocity is v = x - eps, and sampling
integrates dx/dt = v from t = 0 to t = 1.

Everything that depends only on the settings (time grid, step sizes, guidance flags, which
evaluations run the DiT and at which batch) is computed on the host before the first step
(`make_plan`), so the step loop never reads a value back from the device.

It stays one file, longer than the package's other modules, because the sampler exists once:
the plan and the loop that executes it share the evaluation order, and splitting them would
write that order in two places.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtimes.backend import (
    supports_decoder_split,
    supports_refresh,
    supports_step,
    supports_text_embedding,
    supports_velocity,
)
from runtimes.errors import DecoError
from runtimes.sharing import SharingSchedule

__all__ = [
    "CFG_MODES",
    "DIVERGENCE_CHECK_EVERY",
    "DIVERGENCE_LIMIT",
    "MAX_STEPS",
    "RELEASE_SAMPLERS",
    "SOLVERS",
    "SOLVER_ALIASES",
    "Evaluation",
    "SampleDiverged",
    "SamplerConfig",
    "SamplingPlan",
    "condition_arrays",
    "condition_inputs",
    "guidance_flags",
    "make_plan",
    "manifest_defaults",
    "release_sampler",
    "sample",
    "timesteps",
    "torch_linspace",
]

SOLVERS = ("euler", "heun", "heun_reuse", "ab2")
CFG_MODES = ("fast", "reference")
# Older spellings, still accepted (the CLI lists only SOLVERS).
SOLVER_ALIASES = {
    "heun_exact": "heun",
    "heun2": "heun",
    "heun_cheap": "heun_reuse",
    "adams2": "ab2",
    "adams_bashforth2": "ab2",
    "adamlms": "ab2",
}
_BOUNDS = ("(]", "()", "[]", "[)")

# The latent is read back every DIVERGENCE_CHECK_EVERY steps and after the last one. A sane
# latent stays within a few units (noise is N(0, 1), images lie in [-1, 1]); one beyond
# DIVERGENCE_LIMIT, or a NaN or inf, only ever becomes a black or saturated image.
DIVERGENCE_CHECK_EVERY = 10
DIVERGENCE_LIMIT = 1e4
# More steps than any sampler needs (the reference uses 100-250): a typo like 10**7 would
# otherwise allocate gigabytes of per-step arrays before the first step.
MAX_STEPS = 10_000


class SampleDiverged(DecoError, ValueError):
    """The latent became non-finite or exploded during sampling; no image is returned."""


def check_latent(latent: np.ndarray, step: int, num_steps: int) -> None:
    """Raise `SampleDiverged` when ``latent`` (after ``step`` of ``num_steps``, 1-based) holds
    NaN or inf, or magnitudes no sampler step can produce from sane inputs."""
    finite = np.isfinite(latent)
    bad = int(latent.size - np.count_nonzero(finite))
    peak = float(np.max(np.abs(latent[finite]))) if bad < latent.size else float("nan")
    if bad == 0 and peak <= DIVERGENCE_LIMIT:
        return
    what = f"{bad} NaN/inf values" if bad else f"max |x| = {peak:.3g}"
    raise SampleDiverged(
        f"sample diverged at step {step} of {num_steps} ({what}); no image was written. Lower "
        "--guidance or --shift, pass finite standard normal noise, or check the weights"
    )


ProgressCallback = Callable[[int, int, float], None]
ConditionHook = Callable[[int, Any], None]
# After step i: (i, x_t the step started from, the slope taken there or None for a fused step,
# x_next) -> the latent to continue from (see `runtimes.steps.StepHook`).
AfterStepHook = Callable[[int, Any, Any, Any], Any]


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace(start, end, steps)`` on CPU, bit for bit.

    PyTorch computes step = (end - start) / (steps - 1) in float32, then start + i * step for the
    first half and end - (steps - 1 - i) * step for the second half, each with a single rounding
    (its vectorised kernel uses fused multiply-add). The products of a float32 step and an index
    are exact in float64, so evaluating in float64 and rounding once reproduces it. This matters:
    the guidance interval boundary at t = 0.1 depends on the last bit of grid values.
    """
    if steps < 1:
        raise ValueError(f"linspace needs at least one step, got {steps}")
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    first = np.float64(start32) + np.float64(step) * idx
    second = np.float64(end32) - np.float64(step) * (steps - 1 - idx)
    return np.where(idx < steps // 2, first, second).astype(np.float32)


def timesteps(num_steps: int, shift: float = 1.0, last_step: float | None = None) -> np.ndarray:
    """The reference time grid: N + 1 float32 values from 0 to 1.

    linspace(0, 1 - last_step, N) followed by 1.0, then t / (t + (1 - t) * shift), all in float32
    exactly as the reference computes it. ``last_step`` defaults to 1 / N (a uniform grid); DDT
    uses a longer final jump. With N = 100, grid[10] is 0.099999994 < float32(0.1), which is why
    the reference leaves steps 0..10 unguided.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if last_step is None or num_steps == 1:
        last_step = 1.0 / num_steps
    if not 0.0 < last_step <= 1.0:
        raise ValueError(f"last_step must be in (0, 1], got {last_step}")
    if not shift > 0.0:
        raise ValueError(f"shift must be > 0, got {shift}")
    grid = np.concatenate([torch_linspace(0.0, 1.0 - last_step, num_steps), [np.float32(1.0)]])
    grid = grid.astype(np.float32)
    one = np.float32(1.0)
    shifted: np.ndarray = (grid / (grid + (one - grid) * np.float32(shift))).astype(np.float32)
    return shifted


def guidance_flags(
    t: np.ndarray, interval: tuple[float, float], bounds: str = "(]"
) -> np.ndarray:
    """Boolean mask: which times lie inside the guidance interval (compared in float32).

    ``bounds`` picks open/closed ends: "(]" is DeCo's Euler/Heun rule (t_min < t <= t_max), "()"
    the reference's Adams-Bashforth and DDT rule.
    """
    if bounds not in _BOUNDS:
        raise ValueError(f"guidance_bounds must be one of {_BOUNDS}, got {bounds!r}")
    t = np.asarray(t, dtype=np.float32)
    lo, hi = np.float32(interval[0]), np.float32(interval[1])
    above = t >= lo if bounds[0] == "[" else t > lo
    below = t <= hi if bounds[1] == "]" else t < hi
    inside: np.ndarray = above & below
    return inside


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings (all host-side; a config never touches a backend).

    solver: "euler" (x += v dt, last step ordinary), "heun" (2nd order, two evaluations per step,
        the last step Euler as in the reference HeunSampler with exact_henu=True), "heun_reuse"
        (the reference default exact_henu=False: the corrector's evaluation at (x_hat, t_next) is
        reused as the next step's slope, about one evaluation per step), "ab2" (2-step
        Adams-Bashforth with variable step, the first step Euler).
    num_steps: N; ignored when ``timesteps`` is given (N = len(timesteps) - 1).
    shift: timestep shift s in t / (t + (1 - t) s); s > 1 spends more steps near noise.
    timesteps: explicit increasing grid in [0, 1] used as is (no shift), N + 1 values.
    last_step: length of the final jump (None: 1 / N).
    guidance: CFG scale w; v = v_u + w (v_c - v_u) inside the interval, v = v_c outside.
    guidance_interval: (t_min, t_max).
    guidance_bounds: "(]", "()", "[]" or "[)"; None picks the reference's rule for the solver
        ("()" for ab2, "(]" otherwise).
    cfg_mode: "fast" runs the unconditional half only where guidance is active and never when
        w == 1; "reference" runs [uncond; cond] as one batch of 2B at every evaluation and
        combines it as the reference does (u + w (c - u), with w = 1 outside the interval).
    accumulate_time: feed the network a float32 running sum of the step sizes instead of the
        grid values, as the reference's Adams-Bashforth sampler does (its t differs from the grid
        in the last bits).
    """

    solver: str = "euler"
    num_steps: int = 100
    shift: float = 1.0
    timesteps: tuple[float, ...] | None = None
    last_step: float | None = None
    guidance: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    guidance_bounds: str | None = None
    cfg_mode: str = "fast"
    accumulate_time: bool = False

    def __post_init__(self) -> None:
        solver = SOLVER_ALIASES.get(self.solver, self.solver)
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        object.__setattr__(self, "solver", solver)
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")
        if self.guidance_bounds is not None and self.guidance_bounds not in _BOUNDS:
            raise ValueError(
                f"guidance_bounds must be one of {_BOUNDS} or None, got {self.guidance_bounds!r}"
            )
        if not np.isfinite(self.guidance):
            raise ValueError(f"guidance must be a finite number, got {self.guidance}")
        if not (np.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)):
            raise ValueError(
                f"steps must be a positive integer, got {self.num_steps!r} "
                f"({type(self.num_steps).__name__})"
            )
        if not 1 <= self.num_steps <= MAX_STEPS and self.timesteps is None:
            raise ValueError(
                f"steps must be between 1 and {MAX_STEPS}, got {self.num_steps}; DeCo samples "
                "well in 50-250 steps"
            )
        lo, hi = (float(v) for v in self.guidance_interval)
        if not lo < hi:
            raise ValueError(
                f"guidance_interval must be (t_min, t_max) with t_min < t_max, got {(lo, hi)}"
            )
        object.__setattr__(self, "guidance_interval", (lo, hi))
        if self.timesteps is not None:
            grid = np.asarray(self.timesteps, dtype=np.float32)
            if grid.ndim != 1 or grid.size < 2:
                raise ValueError("timesteps must be a list of at least two times (N + 1 values)")
            if not np.all(np.isfinite(grid)) or grid[0] < 0 or grid[-1] > 1:
                raise ValueError("timesteps must lie in [0, 1] (t = 0 noise, t = 1 data)")
            if not np.all(np.diff(grid) > 0):
                raise ValueError("timesteps must be strictly increasing (from noise to data)")
            object.__setattr__(self, "timesteps", tuple(float(v) for v in grid))
            object.__setattr__(self, "num_steps", int(grid.size - 1))
        elif int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")

    @property
    def bounds(self) -> str:
        """The guidance bounds actually used."""
        if self.guidance_bounds is not None:
            return self.guidance_bounds
        return "()" if self.solver == "ab2" else "(]"

    def grid(self) -> np.ndarray:
        """The N + 1 float32 times of this configuration."""
        if self.timesteps is not None:
            return np.asarray(self.timesteps, dtype=np.float32)
        return timesteps(self.num_steps, self.shift, self.last_step)


# The sampler each model family was released with: what an export writes as a bundle's
# "sampler_defaults". A key a manifest leaves out reads as SamplerConfig's own default (Euler,
# 100 steps, no guidance, interval (0, 1], no shift), so nothing else holds a default.
RELEASE_SAMPLERS: dict[str, SamplerConfig] = {
    # Class-conditional DeCo (reference configs_c2i): Euler, 100 steps, CFG 3.2 on (0.1, 1].
    "c2i": SamplerConfig(solver="euler", num_steps=100, guidance=3.2,
                         guidance_interval=(0.1, 1.0), shift=1.0),
    # Text-to-image DeCo (reference configs_t2i, sft_res512.yaml): AB2, 25 steps, CFG 4.0 on
    # (0, 1) exclusive (the first step unguided), timestep shift 3, the network fed the float32
    # running sum of the step sizes.
    "t2i": SamplerConfig(solver="ab2", num_steps=25, guidance=4.0, guidance_interval=(0.0, 1.0),
                         guidance_bounds="()", shift=3.0, accumulate_time=True),
}


def release_sampler(family: str) -> SamplerConfig:
    """The released sampler settings of a model family ("c2i" or "t2i")."""
    if family not in RELEASE_SAMPLERS:
        raise ValueError(f"no released sampler for family {family!r}; expected one of "
                         f"{', '.join(RELEASE_SAMPLERS)}")
    return RELEASE_SAMPLERS[family]


def manifest_defaults(config: SamplerConfig) -> dict[str, Any]:
    """A config in the manifest's "sampler_defaults" form (the keys `SamplerDefaults` reads)."""
    d: dict[str, Any] = {"solver": config.solver, "steps": config.num_steps,
                         "guidance": config.guidance,
                         "guidance_interval": list(config.guidance_interval),
                         "shift": config.shift}
    if config.last_step is not None:
        d["last_step"] = config.last_step
    if config.guidance_bounds is not None:
        d["guidance_bounds"] = config.guidance_bounds
    if config.accumulate_time:
        d["accumulate_time"] = True
    return d


@dataclass(frozen=True)
class Evaluation:
    """One model evaluation: the solver step it belongs to, the time fed, guidance on or off."""

    step: int
    t: float
    guided: bool


@dataclass(frozen=True)
class SamplingPlan:
    """Everything the step loop needs, computed on the host before the first step.

    ``run_dit[k]`` says whether evaluation k runs the DiT (otherwise the last condition is
    reused); ``dit_both[k]`` whether that DiT run computes both CFG halves (it does when any
    evaluation before the next DiT run needs guidance, so a cached condition never lacks the
    unconditional half).
    """

    config: SamplerConfig
    grid: np.ndarray
    dts: tuple[float, ...]
    evaluations: tuple[Evaluation, ...]
    run_dit: tuple[bool, ...]
    dit_both: tuple[bool, ...]
    sharing_mode: str = "reuse"
    ab2_coeffs: tuple[tuple[float, float], ...] = field(default=())

    @property
    def num_steps(self) -> int:
        return len(self.dts)

    @property
    def num_evaluations(self) -> int:
        return len(self.evaluations)

    @property
    def reference_cfg(self) -> bool:
        return self.config.cfg_mode == "reference"

    def needs_both(self, k: int) -> bool:
        """Whether evaluation k runs the decoder on [uncond; cond]."""
        return self.reference_cfg or self.evaluations[k].guided

    def reused_after(self, k: int) -> bool:
        """Whether evaluation k runs the DiT and the next evaluation reuses its condition as
        is ("reuse" mode): then a split decoder caches k's modulation for the reused steps."""
        return (self.sharing_mode == "reuse" and self.run_dit[k]
                and k + 1 < self.num_evaluations and not self.run_dit[k + 1])

    def cost(self, batch_size: int = 1, decoder_split: bool = False,
             text_embedding: bool = False) -> dict[str, int]:
        """Calls and per-sample passes of each graph (what a benchmark should report).

        ``decoder_calls`` / ``decoder_samples`` count the decoder in any form, one call per
        evaluation. With ``decoder_split`` (a backend with the split decoder), the condition
        part runs only where the modulation is new; ``decoder_cond_samples`` says on how many
        samples (the decoder's samples without it). With ``text_embedding`` (a text-to-image
        backend with `embed_text`) the text is embedded once, on the B conditional and B
        unconditional rows (`condition_arrays`): ``text_embed_calls`` / ``text_embed_samples``.
        """
        dit_calls = sum(self.run_dit)
        pairs = zip(self.run_dit, self.dit_both, strict=True)
        dit_rows = sum((2 if both else 1) for run, both in pairs if run)
        dec_rows = sum(2 if self.needs_both(k) else 1 for k in range(self.num_evaluations))
        cost = {
            "steps": self.num_steps,
            "evaluations": self.num_evaluations,
            "dit_calls": dit_calls,
            "dit_samples": dit_rows * batch_size,
            "decoder_calls": self.num_evaluations,
            "decoder_samples": dec_rows * batch_size,
        }
        if decoder_split and any(self.reused_after(k) for k in range(self.num_evaluations)):
            cond_rows = 0
            for k in range(self.num_evaluations):
                if self.reused_after(k):  # the modulation of the DiT's whole batch, cached
                    cond_rows += 2 if self.dit_both[k] else 1
                elif self.run_dit[k] or self.sharing_mode != "reuse":  # the fused decoder
                    cond_rows += 2 if self.needs_both(k) else 1
            cost["decoder_cond_samples"] = cond_rows * batch_size
        if text_embedding:
            cost["text_embed_calls"], cost["text_embed_samples"] = 1, 2 * batch_size
        return cost


def _evaluation_times(config: SamplerConfig, grid: np.ndarray, dts: np.ndarray) -> np.ndarray:
    """The time fed to the network for "the start of step i" (i = 0..N)."""
    if not config.accumulate_time:
        return grid
    acc = np.empty_like(grid)
    acc[0] = grid[0]
    for i, dt in enumerate(dts):
        acc[i + 1] = np.float32(acc[i] + dt)
    return acc


def _ab2_coeffs(grid: np.ndarray) -> tuple[tuple[float, float], ...]:
    """(c_prev, c_cur) per step: v = c_prev v_{i-1} + c_cur v_i, i.e. the variable-step AB2
    weights (-h / 2h', 1 + h / 2h'), computed in float32 with the reference's Lagrange
    pre-integration formula. Step 0 is Euler: (0, 1)."""
    coeffs = [(0.0, 1.0)]
    half = np.float32(0.5)
    for i in range(1, grid.size - 1):
        t1, t2, s, e = grid[i - 1], grid[i], grid[i], grid[i + 1]
        int1 = half / (t1 - t2) * ((e - t2) * (e - t2) - (s - t2) * (s - t2))
        int2 = half / (t2 - t1) * ((e - t1) * (e - t1) - (s - t1) * (s - t1))
        total = np.float32(int1 + int2)
        coeffs.append((float(np.float32(int1 / total)), float(np.float32(int2 / total))))
    return tuple(coeffs)


def _evaluation_list(
    config: SamplerConfig, times: np.ndarray, flags: np.ndarray
) -> list[Evaluation]:
    n = times.size - 1

    def ev(step: int, at: int) -> Evaluation:
        # The reference decides guidance once per step from t_cur, also for the corrector that
        # runs at t_next; keep that so the two agree at the interval boundary.
        return Evaluation(step=step, t=float(times[at]), guided=bool(flags[step]))

    evals: list[Evaluation] = []
    if config.solver in ("euler", "ab2"):
        evals = [ev(i, i) for i in range(n)]
    elif config.solver == "heun":
        for i in range(n):
            evals.append(ev(i, i))
            if i < n - 1:
                evals.append(ev(i, i + 1))
    else:  # heun_reuse
        evals.append(ev(0, 0))
        for i in range(n - 1):
            evals.append(ev(i, i + 1))
    return evals


def make_plan(config: SamplerConfig, sharing: SharingSchedule | None = None) -> SamplingPlan:
    """Precompute grid, step sizes, guidance flags and the DiT schedule for ``config``.

    ``sharing`` lists the evaluations at which the DiT runs (one entry per model evaluation; for
    Euler and AB2 that is one per step). Evaluation 0 always runs it.
    """
    grid = config.grid()
    dts = (grid[1:] - grid[:-1]).astype(np.float32)
    times = _evaluation_times(config, grid, dts)
    flags = guidance_flags(times[:-1], config.guidance_interval, config.bounds)
    if config.cfg_mode == "fast" and config.guidance == 1.0:
        flags[:] = False
    evals = _evaluation_list(config, times, flags)
    n_eval = len(evals)

    mode = "reuse"
    if sharing is None:
        run = np.ones(n_eval, dtype=bool)
    else:
        run = sharing.mask(n_eval)
        mode = sharing.mode
    reference = config.cfg_mode == "reference"
    both = np.zeros(n_eval, dtype=bool)
    starts = np.flatnonzero(run)
    ends = list(starts[1:]) + [n_eval]
    for s, e in zip(starts, ends, strict=True):
        both[s] = reference or any(evals[k].guided for k in range(s, e))
    return SamplingPlan(
        config=config,
        grid=grid,
        dts=tuple(float(d) for d in dts),
        evaluations=tuple(evals),
        run_dit=tuple(bool(r) for r in run),
        dit_both=tuple(bool(b) for b in both),
        sharing_mode=mode,
        ab2_coeffs=_ab2_coeffs(grid) if config.solver == "ab2" else (),
    )


def condition_inputs(
    noise: np.ndarray,
    labels: np.ndarray | Sequence[int],
    null_class: int | None,
    uncond: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(cond, uncond) DiT inputs of batch B: class labels (B,) int64 with the null class, or
    text embeddings (B, L, C) float32 with the unconditional embeddings (B or 1 rows).

    Exactly one of ``null_class`` (labels) and ``uncond`` (embeddings) is given.
    """
    b = noise.shape[0] if noise.ndim == 4 else -1
    if (null_class is None) == (uncond is None):
        raise ValueError(
            "pass null_class with class labels or uncond with text embeddings (one of the two)"
        )
    if uncond is None:
        cond = np.asarray(labels, dtype=np.int64)
        if noise.ndim != 4 or cond.shape != (b,):
            raise ValueError(
                f"noise must be (B, C, H, W) and labels (B,), got {noise.shape} and {cond.shape}"
            )
        return cond, np.full(b, null_class, dtype=np.int64)
    cond = np.ascontiguousarray(labels, dtype=np.float32)
    negative = np.ascontiguousarray(uncond, dtype=np.float32)
    if noise.ndim != 4 or cond.ndim != 3 or cond.shape[0] != b:
        raise ValueError(
            f"noise must be (B, C, H, W) and text embeddings (B, L, C), got {noise.shape} and "
            f"{cond.shape}"
        )
    if negative.shape[0] == 1 and b > 1:
        negative = np.ascontiguousarray(np.broadcast_to(negative, cond.shape))
    if negative.shape != cond.shape:
        raise ValueError(
            f"the unconditional embeddings must be {cond.shape} or (1, *{cond.shape[1:]}), got "
            f"{negative.shape}"
        )
    return cond, negative


def condition_arrays(backend: Any, cond: np.ndarray, uncond: np.ndarray) -> tuple[Any, Any]:
    """The native DiT conditions of one generation: the conditional rows and [uncond; cond].

    For a backend with the text embedding (`supports_text_embedding`), text features become the
    DiT's text tokens here, in one ``embed_text`` call for both halves: the prompt-only work runs
    once per generation instead of once per step.
    """
    both = backend.from_numpy(np.concatenate([uncond, cond]))
    if cond.ndim != 3 or not supports_text_embedding(backend):
        return backend.from_numpy(cond), both
    both = backend.embed_text(both)
    return both[int(uncond.shape[0]):], both


class _Velocity:
    """Evaluates the guided velocity at evaluation k, caching the DiT output between calls.

    Under DiT sharing ("reuse") with a backend that has the split decoder, a DiT run whose
    condition the next evaluations reuse runs ``decoder_cond`` once and ``decoder_pixel`` on
    its output, and the reused evaluations run ``decoder_pixel`` alone on that cached output.
    Every other evaluation runs the fused ``decoder``: measured on the S/16-like model at
    256x256 (docs/benchmarks.md, 2026-12-01), the two split graphs in sequence take as long as
    the fused one or longer (ONNX Runtime fp32 158 against 131 ms at batch 1, 345 against 360
    at batch 2; OpenVINO bf16 135 against 110, 201 against 200), since the per-pixel condition
    makes a round trip through memory that the fused graph keeps inside; so splitting pays
    only where the cached part is reused, and without sharing the sampler runs exactly the
    graphs it ran before the split existed.
    """

    def __init__(
        self,
        backend: Any,
        plan: SamplingPlan,
        cond: np.ndarray,
        uncond: np.ndarray,
        on_condition: ConditionHook | None,
        decoder_split: bool = True,
    ) -> None:
        self.backend = backend
        self.plan = plan
        self.batch = int(cond.shape[0])
        self.on_condition = on_condition
        self.fresh_t = plan.sharing_mode == "fresh_t"
        # DiT sharing in "reuse" mode with a split decoder: a DiT run whose condition later
        # steps reuse computes the decoder's modulation once; the reused steps run only the
        # decoder's pixel part on it. Elsewhere the fused decoder runs (no modulation in memory).
        self.split = [decoder_split and plan.reused_after(k)
                      for k in range(plan.num_evaluations)]
        if any(self.split) and not supports_decoder_split(backend):
            self.split = [False] * plan.num_evaluations
        self.one_graph = supports_velocity(backend)
        if self.one_graph and (on_condition is not None or not all(plan.run_dit)):
            raise ValueError(
                "this model is one graph (the plain DiT baseline): it has no DiT output to share "
                "between steps; sample it without DiT sharing"
            )
        if self.fresh_t and not supports_refresh(backend):
            raise ValueError(
                "sharing mode 'fresh_t' needs a backend that exposes the DiT hidden state and a "
                "refresh graph (supports_refresh); export the bundle with the 'refresh' graph or "
                "use mode 'reuse'"
            )
        b = self.batch
        self.y_cond, self.y_both = condition_arrays(backend, cond, uncond)
        # Time arrays for every evaluation, made before the loop (no host work inside it).
        self.t_single: list[Any] = []
        self.t_double: list[Any | None] = []
        for k, ev in enumerate(plan.evaluations):
            self.t_single.append(backend.from_numpy(np.full(b, ev.t, dtype=np.float32)))
            need_double = plan.needs_both(k) or (plan.run_dit[k] and plan.dit_both[k])
            self.t_double.append(
                backend.from_numpy(np.full(2 * b, ev.t, dtype=np.float32)) if need_double else None
            )
        self.cache: Any = None
        self.cache_both = False
        self.cache_half: Any = None  # the conditional half of a [uncond; cond] cache, sliced once
        self.modulation: Any = None  # the split decoder's modulation of the cached condition
        self.modulation_half: Any = None

    def __call__(self, x: Any, k: int) -> Any:
        plan, backend, b = self.plan, self.backend, self.batch
        both = plan.needs_both(k)
        if self.one_graph:
            return self._one_graph(x, k, both)
        x2 = None
        if both or (plan.run_dit[k] and plan.dit_both[k]):
            x2 = backend.concat([x, x])
        if plan.run_dit[k]:
            dit_both = plan.dit_both[k]
            xd = x2 if dit_both else x
            td = self.t_double[k] if dit_both else self.t_single[k]
            yd = self.y_both if dit_both else self.y_cond
            if self.fresh_t:
                self.cache = backend.dit_hidden(xd, td, yd)
                full = backend.refresh_condition(self.cache, td)
            else:
                full = backend.dit(xd, td, yd)
                self.cache = full
            self.cache_both = dit_both
            self.cache_half = None
            self.modulation = self.modulation_half = None
            if self.on_condition is not None:
                self.on_condition(k, full)
            if self.split[k]:
                mod = self.modulation = backend.decoder_cond(full)
                if dit_both and not both:
                    mod = self.modulation_half = self.modulation[b:]
                return self._guide(backend.decoder_pixel(x2 if both else x, mod), k, both)
            cond = full[b:] if (dit_both and not both) else full
        else:
            if both and not self.cache_both:  # make_plan rules this out; guard the invariant
                raise RuntimeError("cached DiT output lacks the unconditional half")
            if self.modulation is not None:
                mod = self.modulation
                if self.cache_both and not both:
                    if self.modulation_half is None:
                        self.modulation_half = self.modulation[b:]
                    mod = self.modulation_half
                return self._guide(backend.decoder_pixel(x2 if both else x, mod), k, both)
            part = self.cache
            if self.cache_both and not both:
                if self.cache_half is None:
                    self.cache_half = self.cache[b:]
                part = self.cache_half
            if self.fresh_t:
                t_k = self.t_double[k] if both else self.t_single[k]
                cond = backend.refresh_condition(part, t_k)
            else:
                cond = part
        return self._guide(backend.decoder(x2 if both else x, cond), k, both)

    def _guide(self, out: Any, k: int, both: bool) -> Any:
        """The velocity from a decoder output: itself, or the guided mix of its two halves."""
        if not both:
            return out
        b = self.batch
        v_u, v_c = out[:b], out[b:]
        plan = self.plan
        w = plan.config.guidance if plan.evaluations[k].guided else 1.0
        return v_u + (v_c - v_u) * w

    def _one_graph(self, x: Any, k: int, both: bool) -> Any:
        """The velocity of a one-graph model: one call on [uncond; cond] when guided."""
        backend, b = self.backend, self.batch
        if not both:
            return backend.velocity(x, self.t_single[k], self.y_cond)
        out = backend.velocity(backend.concat([x, x]), self.t_double[k], self.y_both)
        v_u, v_c = out[:b], out[b:]
        w = self.plan.config.guidance if self.plan.evaluations[k].guided else 1.0
        return v_u + (v_c - v_u) * w


def sample(
    backend: Any,
    noise: np.ndarray,
    labels: np.ndarray | Sequence[int],
    config: SamplerConfig | SamplingPlan,
    *,
    null_class: int | None = None,
    uncond: np.ndarray | None = None,
    sharing: SharingSchedule | None = None,
    callback: ProgressCallback | None = None,
    on_condition: ConditionHook | None = None,
    fused_step: bool | None = None,
    decoder_split: bool = True,
    after_step: AfterStepHook | None = None,
) -> np.ndarray:
    """Integrate from ``noise`` (t = 0) to a sample (t = 1) and return it as float32 numpy.

    ``noise`` is (B, C, H, W); ``labels`` (B,) class indices with ``null_class`` the
    unconditional label (the model's num_classes), or text embeddings (B, L, C) with ``uncond``
    the unconditional (empty or negative prompt) embeddings, (B, L, C) or (1, L, C).
    ``callback(step_index, num_steps, t)`` runs after each step; ``on_condition(k, cond)``
    receives the native condition of every evaluation k that ran the DiT (used for sharing
    calibration). Pass a precomputed `SamplingPlan` to skip
    planning (``sharing`` must then be None; the plan already holds it).

    ``fused_step``: use the backend's whole-step ``step`` capability where it applies (Euler,
    the DiT at every step, no ``on_condition``). None uses it when the backend offers it; False
    never; True insists (ValueError when it cannot apply).

    ``decoder_split``: under DiT sharing in "reuse" mode, cache the decoder's modulation where
    the backend has the split decoder (``supports_decoder_split``) and run only its pixel part
    on the reused steps. False runs the fused decoder on every step, as a backend without the
    split does (the same velocity to rounding; for comparisons).

    ``after_step(i, x_t, v, x_next)`` runs after each step (after ``callback``) and returns the
    latent to continue from: the application's step callback, cancellation and the inpainting
    blend (`runtimes.steps.StepHook`). ``noise`` is then the latent at ``plan.grid[0]``, which
    an image-to-image run sets to its noised image.
    """
    if isinstance(config, SamplingPlan):
        if sharing is not None:
            raise ValueError("pass sharing to make_plan, not to sample, when giving a plan")
        plan = config
    else:
        plan = make_plan(config, sharing)
    noise = np.ascontiguousarray(noise, dtype=np.float32)
    cond, negative = condition_inputs(noise, labels, null_class, uncond)
    fusable = (
        plan.config.solver == "euler"
        and all(plan.run_dit)
        and on_condition is None
        and supports_step(backend)
        and not supports_velocity(backend)
    )
    if fused_step and not fusable:
        raise ValueError(
            "fused_step=True needs a backend with supports_step, the Euler solver, no DiT "
            "sharing and no on_condition hook"
        )
    if fusable and fused_step is not False:
        return _sample_fused(backend, noise, cond, negative, plan, callback, after_step)
    velocity = _Velocity(backend, plan, cond, negative, on_condition, decoder_split)
    x = backend.from_numpy(noise)
    solver = plan.config.solver
    n = plan.num_steps
    k = 0
    v_prev: Any = None
    for i in range(n):
        dt = plan.dts[i]
        x_t = x
        if solver == "euler":
            v = velocity(x, k)
            k += 1
            x = x + v * dt
        elif solver == "ab2":
            v_i = velocity(x, k)
            k += 1
            c_prev, c_cur = plan.ab2_coeffs[i]
            v = v_i if v_prev is None else v_prev * c_prev + v_i * c_cur
            v_prev = v_i
            x = x + v * dt
        else:  # heun, heun_reuse
            if i == 0 or solver == "heun":
                v = velocity(x, k)
                k += 1
            else:
                v = v_prev
            if i < n - 1:
                x_hat = x + v * dt
                v_hat = velocity(x_hat, k)
                k += 1
                x = x + ((v + v_hat) * 0.5) * dt
                v_prev = v_hat
            else:
                x = x + v * dt
        if (i + 1) % DIVERGENCE_CHECK_EVERY == 0 and i + 1 < n:
            check_latent(np.asarray(backend.to_numpy(x)), i + 1, n)
        if callback is not None:
            callback(i, n, float(plan.grid[i]))
        if after_step is not None:
            x = after_step(i, x_t, v_i if solver == "ab2" else v, x)
    assert k == plan.num_evaluations
    out = np.asarray(backend.to_numpy(x), dtype=np.float32)
    check_latent(out, n, n)
    return out


def _sample_fused(
    backend: Any,
    noise: np.ndarray,
    cond: np.ndarray,
    uncond: np.ndarray,
    plan: SamplingPlan,
    callback: ProgressCallback | None,
    after_step: AfterStepHook | None = None,
) -> np.ndarray:
    """Euler through the backend's fused ``step``: the same arithmetic, one call per step."""
    y_cond, y_both = condition_arrays(backend, cond, uncond)
    x = backend.from_numpy(noise)
    n = plan.num_steps
    for i in range(n):
        ev = plan.evaluations[i]
        # A fused step updates its state buffer in place: the hook gets a host copy of x_t.
        x_t = None if after_step is None else np.array(backend.to_numpy(x), dtype=np.float32)
        if plan.needs_both(i):
            w = plan.config.guidance if ev.guided else 1.0
            x = backend.step(x, y_both, ev.t, plan.dts[i], w)
        else:
            x = backend.step(x, y_cond, ev.t, plan.dts[i], None)
        if (i + 1) % DIVERGENCE_CHECK_EVERY == 0 and i + 1 < n:
            check_latent(np.asarray(backend.to_numpy(x)), i + 1, n)
        if callback is not None:
            callback(i, n, float(plan.grid[i]))
        if after_step is not None:
            x = after_step(i, x_t, None, x)
    out = np.array(backend.to_numpy(x), dtype=np.float32)
    check_latent(out, n, n)
    return out
