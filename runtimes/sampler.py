"""The one sampler: time grids, the step loop, classifier-free guidance and DiT sharing.

The solvers (Euler, Heun, Adams-Bashforth, DPM-Solver++, UniPC, the coefficient table) are
classes in `runtimes.solvers`; the sampler runs whichever the config names through one loop.

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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from runtimes.backend import (
    supports_decoder_split,
    supports_refresh,
    supports_step,
    supports_text_embedding,
    supports_velocity,
    takes_guidance,
)
from runtimes.errors import ConfigError, DecoError
from runtimes.sharing import SharingSchedule
from runtimes.solvers import SOLVER_ALIASES, SOLVERS, Solver, get_solver

__all__ = [
    "CFG_MODES",
    "DIVERGENCE_CHECK_EVERY",
    "DIVERGENCE_LIMIT",
    "FAST_PSNR_DB",
    "FAST_SAMPLERS",
    "MAX_STEPS",
    "RELEASE_SAMPLERS",
    "SOLVERS",
    "SOLVER_ALIASES",
    "Evaluation",
    "SampleDiverged",
    "SamplerConfig",
    "SamplingCost",
    "SamplingPlan",
    "condition_arrays",
    "condition_inputs",
    "distilled_guidance",
    "edge_timesteps",
    "fast_psnr_db",
    "fast_sampler",
    "guidance_flags",
    "make_plan",
    "release_sampler",
    "sample",
    "timesteps",
    "torch_linspace",
]

CFG_MODES = ("fast", "reference")
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
        raise ConfigError(f"linspace needs at least one step, got {steps}")
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
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if last_step is None or num_steps == 1:
        last_step = 1.0 / num_steps
    if not 0.0 < last_step <= 1.0:
        raise ConfigError(f"last_step must be in (0, 1], got {last_step}")
    if not shift > 0.0:
        raise ConfigError(f"shift must be > 0, got {shift}")
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
        raise ConfigError(f"guidance_bounds must be one of {_BOUNDS}, got {bounds!r}")
    t = np.asarray(t, dtype=np.float32)
    lo, hi = np.float32(interval[0]), np.float32(interval[1])
    above = t >= lo if bounds[0] == "[" else t > lo
    below = t <= hi if bounds[1] == "]" else t < hi
    inside: np.ndarray = above & below
    return inside


def edge_timesteps(num_steps: int, shift: float, interval: tuple[float, float],
                   counts: Sequence[int] | None = None) -> np.ndarray:
    """A grid of N + 1 float32 times with a step boundary on each edge of the guidance
    interval that lies inside (0, 1), so no step straddles the jump of the guided velocity.

    The step count is unchanged: the edges split [0, 1] into segments, each gets steps in
    proportion to its length in the unshifted coordinate u (t = u / (u + (1 - u) s)), at least
    one, and inside a segment the steps are uniform in u, as `timesteps` is (an interval with
    no edge inside (0, 1) keeps the `timesteps` grid). N must be at least the number of
    segments (2 for c2i's (0.1, 1]; 1 for an interval (0, 1)).

    ``counts`` (one per segment, at least one each, summing to N) overrides the proportional
    split: a tuned solver table searches it, since where the few steps go on either side of
    the jump matters more than their spacing inside a segment.
    """
    edges = sorted({float(e) for e in interval if 0.0 < float(e) < 1.0})
    if not edges:
        return timesteps(num_steps, shift)  # the reference grid, bit for bit
    # u of each edge under the shift (the inverse of t = u / (u + (1 - u) s))
    cuts = [0.0, *(e * shift / (1.0 - e + e * shift) for e in edges), 1.0]
    lengths = np.diff(cuts)
    if num_steps < lengths.size:
        raise ConfigError(
            f"guidance_edges places a step boundary on each edge of the guidance interval "
            f"{interval}: that needs at least {lengths.size} steps, got {num_steps}"
        )
    if counts is not None:
        given = np.asarray(counts, dtype=int)
        if given.shape != lengths.shape or np.any(given < 1) or int(given.sum()) != num_steps:
            raise ConfigError(
                f"guidance_edges step counts {tuple(int(c) for c in given)} must give each of "
                f"the {lengths.size} segments at least one step and sum to {num_steps}"
            )
        return _segment_grid(cuts, given, edges, shift)
    split = np.maximum(1, np.round(lengths * num_steps)).astype(int)
    while split.sum() != num_steps:  # the rounding's excess or deficit on the longest segment
        j = int(np.argmax(lengths / split)) if split.sum() < num_steps else int(
            np.argmax(np.where(split > 1, split / lengths, -np.inf)))
        split[j] += 1 if split.sum() < num_steps else -1
    return _segment_grid(cuts, split, edges, shift)


def _segment_grid(cuts: Sequence[float], counts: np.ndarray, edges: Sequence[float],
                  shift: float) -> np.ndarray:
    """``counts[k]`` steps uniform in u between ``cuts[k]`` and ``cuts[k + 1]``, mapped to t,
    with each edge exactly on its boundary."""
    u = np.concatenate([np.linspace(cuts[k], cuts[k + 1], int(counts[k]) + 1)[:-1]
                        for k in range(len(counts))] + [np.array([1.0])])
    grid = u / (u + (1.0 - u) * shift)
    out = grid.astype(np.float32)
    for e, k in zip(edges, np.cumsum(counts)[:-1], strict=True):
        out[k] = np.float32(e)  # the edge itself, whatever the rounding of the map
    return out


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value)))


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings (all host-side; a config never touches a backend). The one form of
    them: a bundle's manifest stores one ("sampler_defaults", `to_dict` / `from_dict`),
    ``pipe.sampler_defaults`` is one, and a call's overrides are ``dataclasses.replace``.

    solver: a name in `runtimes.solvers.SOLVERS` (or an alias): "euler", "heun" (2nd order,
        two evaluations per step, the last step Euler as in the reference HeunSampler with
        exact_henu=True), "heun_reuse" (the corrector's evaluation reused as the next step's
        slope, about one evaluation per step), "ab2" (2-step Adams-Bashforth with variable
        step, the first step Euler), "ab3", "dpm++2m" (flow DPM-Solver++ 2M, data prediction),
        "unipc" (bh2, order 2, one evaluation per step) and "table" (N time deltas and a
        lower-triangular coefficient table: ``timesteps`` and ``coefficients``).
    num_steps: N; ignored when ``timesteps`` is given (N = len(timesteps) - 1).
    shift: timestep shift s in t / (t + (1 - t) s); s > 1 spends more steps near noise.
    timesteps: explicit increasing grid in [0, 1] used as is (no shift), N + 1 values.
    last_step: length of the final jump (None: 1 / N).
    guidance: CFG scale w >= 0; v = v_u + w (v_c - v_u) inside the interval, v = v_c outside.
    guidance_interval: (t_min, t_max) with 0 <= t_min < t_max <= 1.
    guidance_bounds: "(]", "()", "[]" or "[)"; None picks the reference's rule for the solver
        ("()" for ab2, "(]" otherwise).
    cfg_mode: "fast" runs the unconditional half only where guidance is active and never when
        w == 1; "reference" runs [uncond; cond] as one batch of 2B at every evaluation and
        combines it as the reference does (u + w (c - u), with w = 1 outside the interval).
    accumulate_time: feed the network a float32 running sum of the step sizes instead of the
        grid values, as the reference's Adams-Bashforth sampler does (its t differs from the grid
        in the last bits).
    coefficients: the "table" solver's N x N strictly lower-triangular table.
    guidance_edges: place a step boundary on each edge of the guidance interval inside (0, 1)
        (`edge_timesteps`; the step count is unchanged), decide guidance per step by whether
        the step lies inside the interval (so the bounds' open or closed ends no longer
        matter), and restart multistep solvers' history where guidance switches: no step and
        no extrapolation straddles the jump of the guided velocity field.
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
    coefficients: tuple[tuple[float, ...], ...] | None = None
    guidance_edges: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", get_solver(self.solver).name)
        if self.cfg_mode not in CFG_MODES:
            raise ConfigError(f"cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")
        if self.guidance_bounds is not None and self.guidance_bounds not in _BOUNDS:
            raise ConfigError(
                f"guidance_bounds must be one of {_BOUNDS} or None, got {self.guidance_bounds!r}"
            )
        if not _is_number(self.guidance) or self.guidance < 0:
            raise ConfigError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if not (_is_number(self.shift) and self.shift > 0):
            raise ConfigError(f"shift must be a finite number > 0, got {self.shift!r}")
        object.__setattr__(self, "guidance", float(self.guidance))
        object.__setattr__(self, "shift", float(self.shift))
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)):
            raise ConfigError(
                f"steps must be a positive integer, got {self.num_steps!r} "
                f"({type(self.num_steps).__name__})"
            )
        if not 1 <= self.num_steps <= MAX_STEPS and self.timesteps is None:
            raise ConfigError(
                f"steps must be between 1 and {MAX_STEPS}, got {self.num_steps}; DeCo samples "
                "well in 50-250 steps (4-16 with a few-step solver)"
            )
        if self.last_step is not None and not (_is_number(self.last_step)
                                               and 0 < self.last_step <= 1):
            raise ConfigError(f"last_step must be in (0, 1], got {self.last_step!r}")
        interval = tuple(self.guidance_interval)
        if len(interval) != 2 or not all(_is_number(v) for v in interval):
            raise ConfigError(
                f"guidance_interval must be (t_min, t_max), two numbers, got {interval!r}")
        lo, hi = (float(v) for v in interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(
                f"guidance_interval must be (t_min, t_max) with 0 <= t_min < t_max <= 1, got "
                f"{(lo, hi)}"
            )
        object.__setattr__(self, "guidance_interval", (lo, hi))
        if self.timesteps is not None:
            grid = np.asarray(self.timesteps, dtype=np.float32)
            if grid.ndim != 1 or grid.size < 2:
                raise ConfigError(
                    "timesteps must be a list of at least two times (N + 1 values)")
            if not np.all(np.isfinite(grid)) or grid[0] < 0 or grid[-1] > 1:
                raise ConfigError("timesteps must lie in [0, 1] (t = 0 noise, t = 1 data)")
            if not np.all(np.diff(grid) > 0):
                raise ConfigError("timesteps must be strictly increasing (from noise to data)")
            object.__setattr__(self, "timesteps", tuple(float(v) for v in grid))
            object.__setattr__(self, "num_steps", int(grid.size - 1))
        elif self.guidance_edges and self.last_step is not None:
            raise ConfigError("guidance_edges makes its own grid; it cannot take last_step "
                              "(pass explicit timesteps instead)")
        if self.coefficients is not None:
            table = np.asarray(self.coefficients, dtype=np.float64)
            if table.ndim != 2 or not np.all(np.isfinite(table)):
                raise ConfigError("coefficients must be a table of finite numbers (N rows of N)")
            object.__setattr__(self, "coefficients",
                               tuple(tuple(float(v) for v in row) for row in table))
        if (self.coefficients is None) != (self.solver != "table"):
            raise ConfigError("coefficients go with solver 'table' and only with it")

    @property
    def bounds(self) -> str:
        """The guidance bounds actually used."""
        if self.guidance_bounds is not None:
            return self.guidance_bounds
        return get_solver(self.solver).default_bounds

    def grid(self) -> np.ndarray:
        """The N + 1 float32 times of this configuration."""
        if self.timesteps is not None:
            return np.asarray(self.timesteps, dtype=np.float32)
        if self.guidance_edges:
            return edge_timesteps(self.num_steps, self.shift, self.guidance_interval)
        return timesteps(self.num_steps, self.shift, self.last_step)

    # -- the manifest's "sampler_defaults" ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The manifest form: the five keys every bundle has, then only the settings that
        differ from their defaults (so older manifests stay byte-identical)."""
        d: dict[str, Any] = {"solver": self.solver, "steps": self.num_steps,
                             "guidance": self.guidance,
                             "guidance_interval": list(self.guidance_interval),
                             "shift": self.shift}
        if self.last_step is not None:
            d["last_step"] = self.last_step
        if self.guidance_bounds is not None:
            d["guidance_bounds"] = self.guidance_bounds
        if self.accumulate_time:
            d["accumulate_time"] = True
        if self.timesteps is not None:
            d["timesteps"] = list(self.timesteps)
        if self.coefficients is not None:
            d["coefficients"] = [list(row) for row in self.coefficients]
        if self.guidance_edges:
            d["guidance_edges"] = True
        if self.cfg_mode != "fast":
            d["cfg_mode"] = self.cfg_mode
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplerConfig:
        """Read the manifest form; a key left out reads as the field's default (Euler, 100
        steps, no guidance, interval (0, 1], no shift), an unknown key (a newer writer's) is
        ignored, and a mistyped value is a ConfigError naming ``sampler_defaults.<key>``."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ConfigError(f"sampler_defaults must be an object, got {d!r}")

        def bad(key: str, need: str) -> ConfigError:
            return ConfigError(f"sampler_defaults.{key} must be {need}, got {d[key]!r}")

        def is_list(v: Any) -> bool:
            return isinstance(v, (list, tuple))

        checks: dict[str, tuple[str, str, Callable[[Any], bool]]] = {
            "solver": ("solver", "a solver name", lambda v: isinstance(v, str)),
            "steps": ("num_steps", "a positive integer",
                      lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            "guidance": ("guidance", "a finite number >= 0", lambda v: _is_number(v) and v >= 0),
            "guidance_interval": (
                "guidance_interval", "[t_min, t_max] with 0 <= t_min < t_max <= 1",
                lambda v: is_list(v) and len(v) == 2 and all(_is_number(x) for x in v)
                and 0 <= v[0] < v[1] <= 1),
            "shift": ("shift", "a finite number > 0", lambda v: _is_number(v) and v > 0),
            "last_step": ("last_step", "a number in (0, 1] or null",
                          lambda v: v is None or (_is_number(v) and 0 < v <= 1)),
            "guidance_bounds": ("guidance_bounds", f"one of {_BOUNDS} or null",
                                lambda v: v is None or v in _BOUNDS),
            "accumulate_time": ("accumulate_time", "true or false",
                                lambda v: isinstance(v, bool)),
            "timesteps": ("timesteps", "a list of increasing times in [0, 1] or null",
                          lambda v: v is None or (is_list(v)
                                                  and all(_is_number(x) for x in v))),
            "coefficients": ("coefficients", "a table (a list of lists of numbers) or null",
                             lambda v: v is None or (is_list(v) and all(
                                 is_list(r) and all(_is_number(x) for x in r) for r in v))),
            "guidance_edges": ("guidance_edges", "true or false", lambda v: isinstance(v, bool)),
            "cfg_mode": ("cfg_mode", f"one of {CFG_MODES}", lambda v: v in CFG_MODES),
        }
        kwargs: dict[str, Any] = {}
        for key, (attr, need, ok) in checks.items():
            if key not in d:
                continue
            if not ok(d[key]):
                raise bad(key, need)
            kwargs[attr] = d[key]
        if "guidance_interval" in kwargs:
            kwargs["guidance_interval"] = tuple(float(v) for v in kwargs["guidance_interval"])
        for key in ("timesteps", "coefficients"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key]) if key == "timesteps" else tuple(
                    tuple(r) for r in kwargs[key])
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"sampler_defaults: {exc}") from None


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


# Each family's recommended few-step setting (`deco sample --fast`): the solver, its step count
# and the guidance edges, applied over the bundle's own guidance, interval and shift. Each is
# the fewest-evaluation untuned setting measured at the release sampler's image quality: the
# paired KID difference to the release, 1,000 samples from the same seeds and conditions, has a
# 90 % interval that includes 0 or lies below it (docs/sampling.md).
FAST_SAMPLERS: dict[str, dict[str, Any]] = {
    # KID - release -0.3e-3 [-1.8e-3, +1.2e-3] at 12.5x fewer evaluations than Euler 100 and
    # 0.08 of its time; 26.5 dB against the converged sample. At 6 steps +1.9e-3 [+0.0, +3.8].
    "c2i": {"solver": "unipc", "num_steps": 8, "guidance_edges": True},
    # On a flat grid (shift 1 where the release samples at shift 3): KID - release +0.3e-3
    # [-0.4e-3, +1.0e-3], top-1 0.065 against 0.068, at 3.1x fewer evaluations than AB2 25 and
    # about 0.31 of its time; 28.4 dB. At shift 3 no solver reaches the release below 16 steps
    # (its 8-step grid ends with a jump from t = 0.7 to 1).
    "t2i": {"solver": "dpm++2m", "num_steps": 8, "guidance_edges": True, "shift": 1.0},
    # A guidance-distilled text-to-image model, one conditional pass per step: KID - release
    # +0.6e-3 [-0.7e-3, +1.9e-3] from 6 single passes where the release runs 49 (25 steps, 24
    # guided), 0.12 of its time; it follows prompts less (top-1 0.040 against 0.068).
    "t2i-distilled": {"solver": "unipc", "num_steps": 6, "guidance_edges": True},
    # The guidance-distilled class-conditional model, one conditional pass per step: KID -
    # release -2.6e-3 [-4.4e-3, -0.7e-3] from 8 single passes where the release runs 189 (100
    # steps, 89 guided), 0.04 of its time.
    "c2i-distilled": {"solver": "unipc", "num_steps": 8, "guidance_edges": True},
}
# `--fast` on a bundle with tuned solver tables takes the fewest-step table whose recorded
# held-out PSNR reaches this (docs/sampling.md); None: never a table. c2i: the untuned
# setting's own PSNR; the 8-NFE table (34.2 dB recorded) is better than the release by KID
# (-0.9e-3 [-1.6e-3, -0.0e-3]). t2i: no table reached the release's KID (the 8-NFE table, 38.8
# dB recorded, +5.0e-3; a longer fit to 42.1 dB did no better), so its PSNR cannot say which would.
# Keyed as FAST_SAMPLERS: a guidance-distilled model's tables are fitted to the student, whose
# PSNR-to-KID relation was not measured, so `--fast` takes none of them.
FAST_PSNR_DB: dict[str, float | None] = {"c2i": 26.5, "t2i": None}


def fast_psnr_db(family: str, guidance_distilled: bool = False) -> float | None:
    """The held-out PSNR a tuned table of such a model must have recorded for `--fast` to
    take it (`FAST_PSNR_DB`); None: `--fast` takes no table."""
    return FAST_PSNR_DB.get(f"{family}-distilled" if guidance_distilled else family)


def fast_sampler(family: str, guidance_distilled: bool = False) -> dict[str, Any]:
    """`deco sample --fast`'s setting (solver, steps, guidance edges, and a shift where it is
    not the model's) for a model of ``family``: a guidance-distilled model's own where one was
    measured, else the family's."""
    key = f"{family}-distilled"
    if guidance_distilled and key in FAST_SAMPLERS:
        return FAST_SAMPLERS[key]
    if family not in FAST_SAMPLERS:
        raise ConfigError(f"no few-step setting for the family {family!r}; choose --solver and "
                          "--steps")
    return FAST_SAMPLERS[family]


def release_sampler(family: str) -> SamplerConfig:
    """The released sampler settings of a model family ("c2i" or "t2i")."""
    if family not in RELEASE_SAMPLERS:
        raise ConfigError(f"no released sampler for family {family!r}; expected one of "
                          f"{', '.join(RELEASE_SAMPLERS)}")
    return RELEASE_SAMPLERS[family]


@dataclass(frozen=True)
class Evaluation:
    """One model evaluation: the solver step it belongs to, the time fed, guidance on or off."""

    step: int
    t: float
    guided: bool


@dataclass(frozen=True)
class SamplingCost:
    """Graph calls and per-sample passes of one generation (`SamplingPlan.cost`): what a
    benchmark reports and the FLOP count multiplies (`deco_export.flops.sampling_flops`).

    ``decoder_calls`` / ``decoder_samples`` count the decoder in any form, one call per
    evaluation. ``decoder_cond_samples``: with the split decoder under DiT sharing, the samples
    its condition part ran on (None: the fused decoder ran it on every decoder sample).
    ``text_embed_calls`` / ``text_embed_samples``: a text-to-image backend's once-per-generation
    text embedding (0 for a backend without it).
    """

    steps: int
    evaluations: int
    dit_calls: int
    dit_samples: int
    decoder_calls: int
    decoder_samples: int
    decoder_cond_samples: int | None = None
    text_embed_calls: int = 0
    text_embed_samples: int = 0

    @classmethod
    def nothing(cls) -> SamplingCost:
        """The cost of a call that runs no step (image-to-image at strength 0)."""
        return cls(0, 0, 0, 0, 0, 0)

    def to_dict(self) -> dict[str, int]:
        """The JSON form (a bench row's "cost"): the counts that apply, as `from_dict` reads
        them back (no ``decoder_cond_samples`` without the split decoder, no text embedding
        counts without it)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.decoder_cond_samples is None:
            del out["decoder_cond_samples"]
        if not self.text_embed_calls:
            del out["text_embed_calls"], out["text_embed_samples"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingCost:
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})

    def __getitem__(self, key: str) -> int:
        """``cost["dit_samples"]``: code written when the cost was its JSON dict still reads
        it (a count that does not apply is a KeyError there, as it was)."""
        return self.to_dict()[key]


@dataclass(frozen=True)
class SamplingPlan:
    """Everything the step loop needs, computed on the host before the first step.

    ``run_dit[k]`` says whether evaluation k runs the DiT (otherwise the last condition is
    reused); ``dit_both[k]`` whether that DiT run computes both CFG halves (it does when any
    evaluation before the next DiT run needs guidance, so a cached condition never lacks the
    unconditional half). ``coefficients`` is the solver's per-step constants (`Solver.prepare`)
    and ``restarts[i]`` whether the velocity field may jump after step i (a guidance edge under
    ``guidance_edges``), where multistep solvers drop their history.
    """

    config: SamplerConfig
    grid: np.ndarray
    dts: tuple[float, ...]
    evaluations: tuple[Evaluation, ...]
    run_dit: tuple[bool, ...]
    dit_both: tuple[bool, ...]
    sharing_mode: str = "reuse"
    coefficients: tuple[Any, ...] = ()
    restarts: tuple[bool, ...] = ()

    @property
    def solver(self) -> Solver:
        return get_solver(self.config.solver)

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
             text_embedding: bool = False, distilled: bool = False) -> SamplingCost:
        """Calls and per-sample passes of each graph (what a benchmark should report).

        With ``decoder_split`` (a backend with the split decoder), the condition part runs
        only where the modulation is new (``decoder_cond_samples``). With ``text_embedding``
        (a text-to-image backend with `embed_text`) the text is embedded once, on the B
        conditional and B unconditional rows (`condition_arrays`). With ``distilled`` (a
        guidance-distilled backend, `takes_guidance`) every call runs the B conditional rows
        only: the sampler runs no unconditional half and embeds no negative prompt.
        """
        # The rows (per batch sample) of evaluation k's DiT run and of its decoder.
        dit_both = [both and not distilled for both in self.dit_both]
        dec_both = [self.needs_both(k) and not distilled for k in range(self.num_evaluations)]
        pairs = zip(self.run_dit, dit_both, strict=True)
        dit_rows = sum((2 if both else 1) for run, both in pairs if run)
        dec_rows = sum(2 if both else 1 for both in dec_both)
        cond_samples = None
        if decoder_split and any(self.reused_after(k) for k in range(self.num_evaluations)):
            cond_rows = 0
            for k in range(self.num_evaluations):
                if self.reused_after(k):  # the modulation of the DiT's whole batch, cached
                    cond_rows += 2 if dit_both[k] else 1
                elif self.run_dit[k] or self.sharing_mode != "reuse":  # the fused decoder
                    cond_rows += 2 if dec_both[k] else 1
            cond_samples = cond_rows * batch_size
        return SamplingCost(
            steps=self.num_steps,
            evaluations=self.num_evaluations,
            dit_calls=sum(self.run_dit),
            dit_samples=dit_rows * batch_size,
            decoder_calls=self.num_evaluations,
            decoder_samples=dec_rows * batch_size,
            decoder_cond_samples=cond_samples,
            text_embed_calls=1 if text_embedding else 0,
            text_embed_samples=((1 if distilled else 2) * batch_size) if text_embedding else 0,
        )


def _evaluation_times(config: SamplerConfig, grid: np.ndarray, dts: np.ndarray) -> np.ndarray:
    """The time fed to the network for "the start of step i" (i = 0..N)."""
    if not config.accumulate_time:
        return grid
    acc = np.empty_like(grid)
    acc[0] = grid[0]
    for i, dt in enumerate(dts):
        acc[i + 1] = np.float32(acc[i] + dt)
    return acc


def _step_guidance(config: SamplerConfig, grid: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Whether each step is guided: the reference's rule on the time fed at the step's start,
    or, under ``guidance_edges``, whether the step lies inside the interval (its midpoint)."""
    if not config.guidance_edges:
        return guidance_flags(times[:-1], config.guidance_interval, config.bounds)
    mid = (grid[:-1].astype(np.float64) + grid[1:]) / 2.0
    lo, hi = config.guidance_interval
    inside: np.ndarray = (mid > lo) & (mid < hi)
    return inside


def _evaluation_list(
    solver: Solver, times: np.ndarray, flags: np.ndarray, restarts: Sequence[bool]
) -> list[Evaluation]:
    # The reference decides guidance once per step from t_cur, also for the corrector that
    # runs at t_next; keep that so the two agree at the interval boundary.
    return [Evaluation(step=step, t=float(times[at]), guided=bool(flags[step]))
            for step, at in solver.evaluation_points(times.size - 1, restarts)]


def make_plan(config: SamplerConfig, sharing: SharingSchedule | None = None) -> SamplingPlan:
    """Precompute grid, step sizes, guidance flags, the solver's coefficients and the DiT
    schedule for ``config``.

    ``sharing`` lists the evaluations at which the DiT runs (one entry per model evaluation; for
    the one-evaluation-per-step solvers that is one per step). Evaluation 0 always runs it.
    """
    solver = get_solver(config.solver)
    grid = config.grid()
    dts = (grid[1:] - grid[:-1]).astype(np.float32)
    times = _evaluation_times(config, grid, dts)
    flags = _step_guidance(config, grid, times)
    if config.cfg_mode == "fast" and config.guidance == 1.0:
        flags[:] = False
    # Where guidance switches on or off the guided velocity jumps (unless w = 1).
    jumps = config.guidance_edges and config.guidance != 1.0
    restarts = tuple(bool(jumps and i + 1 < flags.size and flags[i] != flags[i + 1])
                     for i in range(flags.size))
    coefficients = solver.prepare(grid, restarts, config.coefficients)
    evals = _evaluation_list(solver, times, flags, restarts)
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
        coefficients=coefficients,
        restarts=restarts,
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
        raise ConfigError(
            "pass null_class with class labels or uncond with text embeddings (one of the two)"
        )
    if uncond is None:
        cond = np.asarray(labels, dtype=np.int64)
        if noise.ndim != 4 or cond.shape != (b,):
            raise ConfigError(
                f"noise must be (B, C, H, W) and labels (B,), got {noise.shape} and {cond.shape}"
            )
        return cond, np.full(b, null_class, dtype=np.int64)
    cond = np.ascontiguousarray(labels, dtype=np.float32)
    negative = np.ascontiguousarray(uncond, dtype=np.float32)
    if noise.ndim != 4 or cond.ndim != 3 or cond.shape[0] != b:
        raise ConfigError(
            f"noise must be (B, C, H, W) and text embeddings (B, L, C), got {noise.shape} and "
            f"{cond.shape}"
        )
    if negative.shape[0] == 1 and b > 1:
        negative = np.ascontiguousarray(np.broadcast_to(negative, cond.shape))
    if negative.shape != cond.shape:
        raise ConfigError(
            f"the unconditional embeddings must be {cond.shape} or (1, *{cond.shape[1:]}), got "
            f"{negative.shape}"
        )
    return cond, negative


def condition_arrays(backend: Any, cond: np.ndarray, uncond: np.ndarray) -> tuple[Any, Any]:
    """The native DiT conditions of one generation: the conditional rows and [uncond; cond].

    For a backend with the text embedding (`supports_text_embedding`), text features become the
    DiT's text tokens here, in one ``embed_text`` call for both halves: the prompt-only work runs
    once per generation instead of once per step. A guidance-distilled backend
    (`takes_guidance`) never runs the unconditional half, so only its conditional rows are
    embedded and the second array is None.
    """
    if takes_guidance(backend):
        if cond.ndim == 3 and supports_text_embedding(backend):
            return backend.embed_text(backend.from_numpy(cond)), None
        return backend.from_numpy(cond), None
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
        # A guidance-distilled model gives the guided velocity in one conditional pass: no
        # evaluation runs an unconditional half, and its DiT is fed w where the plan guides
        # and 1 elsewhere (`distilled_guidance`).
        self.distilled = takes_guidance(backend)
        self.one_graph = supports_velocity(backend)
        if self.one_graph and (on_condition is not None or not all(plan.run_dit)):
            raise ConfigError(
                "this model is one graph (the plain DiT baseline): it has no DiT output to share "
                "between steps; sample it without DiT sharing"
            )
        if self.fresh_t and not supports_refresh(backend):
            raise ConfigError(
                "sharing mode 'fresh_t' needs a backend that exposes the DiT hidden state and a "
                "refresh graph (supports_refresh); export the bundle with the 'refresh' graph or "
                "use mode 'reuse'"
            )
        b = self.batch
        self.y_cond, self.y_both = condition_arrays(backend, cond, uncond)
        # Time arrays for every evaluation, made before the loop (no host work inside it).
        self.t_single: list[Any] = []
        self.t_double: list[Any | None] = []
        self.guidance: list[tuple[Any, ...]] = [
            (backend.from_numpy(w),) for w in distilled_guidance(plan, b)
        ] if self.distilled else [()] * plan.num_evaluations
        for k, ev in enumerate(plan.evaluations):
            self.t_single.append(backend.from_numpy(np.full(b, ev.t, dtype=np.float32)))
            need_double = self._both(k) or (plan.run_dit[k] and self._dit_both(k))
            self.t_double.append(
                backend.from_numpy(np.full(2 * b, ev.t, dtype=np.float32)) if need_double else None
            )
        self.cache: Any = None
        self.cache_both = False
        self.cache_half: Any = None  # the conditional half of a [uncond; cond] cache, sliced once
        self.modulation: Any = None  # the split decoder's modulation of the cached condition
        self.modulation_half: Any = None

    def _both(self, k: int) -> bool:
        """Whether evaluation k runs the decoder on [uncond; cond] (never when distilled)."""
        return not self.distilled and self.plan.needs_both(k)

    def _dit_both(self, k: int) -> bool:
        return not self.distilled and self.plan.dit_both[k]

    def __call__(self, x: Any, k: int) -> Any:
        plan, backend, b = self.plan, self.backend, self.batch
        both = self._both(k)
        if self.one_graph:
            return self._one_graph(x, k, both)
        x2 = None
        if both or (plan.run_dit[k] and self._dit_both(k)):
            x2 = backend.concat([x, x])
        if plan.run_dit[k]:
            dit_both = self._dit_both(k)
            xd = x2 if dit_both else x
            td = self.t_double[k] if dit_both else self.t_single[k]
            yd = self.y_both if dit_both else self.y_cond
            if self.fresh_t:
                self.cache = backend.dit_hidden(xd, td, yd, *self.guidance[k])
                full = backend.refresh_condition(self.cache, td)
            else:
                full = backend.dit(xd, td, yd, *self.guidance[k])
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


def distilled_guidance(plan: SamplingPlan, batch: int) -> list[np.ndarray]:
    """The guidance input of a guidance-distilled model at each evaluation, (B,) float32: the
    scale w where the plan guides, 1 (the conditional velocity) where the interval leaves the
    step unguided or w = 1. Under DiT sharing the DiT's evaluation decides for the steps that
    reuse its condition, as it decides whether a cached condition holds both halves."""
    w = np.float32(plan.config.guidance)
    out = []
    for k, ev in enumerate(plan.evaluations):
        guided = plan.dit_both[k] if plan.run_dit[k] else ev.guided
        out.append(np.full(batch, w if guided else np.float32(1.0), dtype=np.float32))
    return out


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
    never; True insists (ConfigError when it cannot apply).

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
            raise ConfigError("pass sharing to make_plan, not to sample, when giving a plan")
        plan = config
    else:
        plan = make_plan(config, sharing)
    noise = np.ascontiguousarray(noise, dtype=np.float32)
    cond, negative = condition_inputs(noise, labels, null_class, uncond)
    fusable = (
        plan.solver.fusable
        and all(plan.run_dit)
        and on_condition is None
        and supports_step(backend)
        and not supports_velocity(backend)
        and not takes_guidance(backend)
    )
    if fused_step and not fusable:
        raise ConfigError(
            "fused_step=True needs a backend with supports_step, the Euler solver, no DiT "
            "sharing and no on_condition hook"
        )
    if fusable and fused_step is not False:
        return _sample_fused(backend, noise, cond, negative, plan, callback, after_step)
    velocity = _Velocity(backend, plan, cond, negative, on_condition, decoder_split)
    solver = plan.solver
    state = solver.start()
    count = [0]  # evaluations run so far: the plan's evaluation order is the solver's
    # For after_step: the last velocity evaluated, and the one evaluated at this step's x_t.
    latest: list[Any] = [None, None]
    previous: Any = None

    def evaluate(x_k: Any) -> Any:
        k = count[0]
        count[0] = k + 1
        v = velocity(x_k, k)
        latest[0] = v
        if x_k is x_t:
            latest[1] = v
        return v

    x = backend.from_numpy(noise)
    n = plan.num_steps
    for i in range(n):
        x_t = x
        latest[1] = None
        x = solver.step(i, x, plan.dts[i], plan.coefficients, state, evaluate)
        if (i + 1) % DIVERGENCE_CHECK_EVERY == 0 and i + 1 < n:
            check_latent(np.asarray(backend.to_numpy(x)), i + 1, n)
        if callback is not None:
            callback(i, n, float(plan.grid[i]))
        if after_step is not None:
            # The velocity at x_t: evaluated this step, or reused from the last one.
            x = after_step(i, x_t, latest[1] if latest[1] is not None else previous, x)
        previous = latest[0]
    assert count[0] == plan.num_evaluations
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
