"""Solver tables tuned for one model: the record a bundle's manifest keeps under
"solver_tables", and the lookup behind ``solver="tuned"``.

A tuned table is the coefficient-table solver (`runtimes.solvers.Table`: N time deltas and a
strictly lower-triangular N x N table) fitted to one model's own velocity field against a
many-step teacher (``deco calibrate BUNDLE --solver --nfe ...``). It is only valid for the
model, NFE, guidance, guidance interval and shift it was fitted at, so it is stored under
`solver_table_key` of exactly those, as DiT-sharing schedules are (`runtimes.schedule_key`).
Its grid keeps a step boundary on each edge of the guidance interval (it runs with
``guidance_edges``), so the guidance of every step is the one it was fitted with.

``heldout`` records the table's error on noises (and labels or prompts) the fit never saw,
against the teacher, next to the untuned solvers' at the same NFE; ``deco validate`` measures
it again on the machine it runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from runtimes.errors import ConfigError
from runtimes.sampler import SamplerConfig

__all__ = ["TUNED", "SolverTable", "fast_table", "find_solver_table", "solver_table_key",
           "tuned_config"]

# The solver name that picks a bundle's tuned table for the call's NFE, guidance and shift.
TUNED = "tuned"
MAKE_ONE = "make one with `deco calibrate BUNDLE --solver --nfe N`"


def solver_table_key(model_hash: str, nfe: int, guidance: float,
                     interval: tuple[float, float], shift: float) -> str:
    """The key a tuned table is stored under: the model (its sha256's first 16 digits), the
    NFE (its step count), the guidance scale, the guidance interval and the shift."""
    lo, hi = (float(v) for v in interval)
    return (f"{model_hash[:16]}-n{int(nfe)}-g{float(guidance):g}-i{lo:g},{hi:g}"
            f"-s{float(shift):g}")


@dataclass(frozen=True)
class SolverTable:
    """One tuned coefficient table and what it was fitted for.

    model_sha256: the weights it was fitted to (the bundle's source sha256).
    nfe: steps N (one evaluation each); guidance, guidance_interval, shift: the sampler settings
        it was fitted at (its key).
    timesteps: N + 1 increasing times from 0 to 1 (a step boundary on each guidance edge).
    coefficients: N x N strictly lower-triangular (row i weights the velocities of steps j < i).
    heldout: {"psnr_db", "noises", "seed", "teacher", "baselines": {solver: psnr_db}, ...}.
    fit: how it was fitted (calibration samples and seed, iterations, losses, seconds).
    """

    model_sha256: str
    nfe: int
    guidance: float
    guidance_interval: tuple[float, float]
    shift: float
    timesteps: tuple[float, ...]
    coefficients: tuple[tuple[float, ...], ...]
    heldout: Mapping[str, Any] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.nfe)
        grid = np.asarray(self.timesteps, np.float64)
        table = np.asarray(self.coefficients, np.float64)
        if grid.shape != (n + 1,) or table.shape != (n, n):
            raise ConfigError(f"solver table {self.key}: needs {n + 1} timesteps and a {n} x {n} "
                              f"table, got {grid.shape[0]} and {table.shape}")
        if not (np.all(np.isfinite(table)) and np.all(np.isfinite(grid))):
            raise ConfigError(f"solver table {self.key}: holds non-finite numbers")
        if np.any(np.triu(table) != 0):
            raise ConfigError(f"solver table {self.key}: the table must be strictly lower "
                              "triangular")
        # The grid, the table and the guidance are checked once more by SamplerConfig.
        self.sampler_config(SamplerConfig())

    @property
    def key(self) -> str:
        return solver_table_key(self.model_sha256, self.nfe, self.guidance,
                                self.guidance_interval, self.shift)

    def matches(self, model_hash: str, config: SamplerConfig) -> bool:
        """Whether this table was fitted for ``model_hash`` at ``config``'s step count,
        guidance, interval and shift (compared as they are written in the key)."""
        return self.key == solver_table_key(model_hash, config.num_steps, config.guidance,
                                            config.guidance_interval, config.shift)

    def sampler_config(self, base: SamplerConfig) -> SamplerConfig:
        """``base`` (the bundle's defaults: bounds, time feeding, CFG mode) running this table:
        the "table" solver on its grid with guidance edges, at its guidance and shift."""
        try:
            return replace(base, solver="table", timesteps=tuple(self.timesteps),
                           coefficients=tuple(tuple(r) for r in self.coefficients),
                           guidance=float(self.guidance),
                           guidance_interval=tuple(self.guidance_interval),  # type: ignore[arg-type]
                           shift=float(self.shift), guidance_edges=True, last_step=None)
        except ConfigError as exc:
            raise ConfigError(f"solver table {self.key}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"model_sha256": self.model_sha256, "nfe": int(self.nfe),
                "guidance": float(self.guidance),
                "guidance_interval": [float(v) for v in self.guidance_interval],
                "shift": float(self.shift), "timesteps": [float(v) for v in self.timesteps],
                "coefficients": [[float(v) for v in row] for row in self.coefficients],
                "heldout": dict(self.heldout), "fit": dict(self.fit)}

    @classmethod
    def from_dict(cls, d: Any) -> SolverTable:
        """Read the manifest form; a missing or mistyped field is a ConfigError naming it."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a solver table must be an object, got {type(d).__name__}")
        try:
            interval = tuple(float(v) for v in d["guidance_interval"])
            return cls(model_sha256=str(d["model_sha256"]), nfe=int(d["nfe"]),
                       guidance=float(d["guidance"]),
                       guidance_interval=(interval[0], interval[1]),
                       shift=float(d["shift"]),
                       timesteps=tuple(float(v) for v in d["timesteps"]),
                       coefficients=tuple(tuple(float(v) for v in row)
                                          for row in d["coefficients"]),
                       heldout=dict(d.get("heldout", {})), fit=dict(d.get("fit", {})))
        except KeyError as exc:
            raise ConfigError(f"a solver table lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"a solver table has a malformed field ({exc})") from None


def find_solver_table(tables: Mapping[str, SolverTable], model_hash: str,
                      config: SamplerConfig) -> SolverTable:
    """The table fitted for ``model_hash`` at ``config``'s NFE, guidance, interval and shift;
    a one-line ConfigError naming the tables there are and the command that makes one."""
    for table in tables.values():
        if table.matches(model_hash, config):
            return table
    want = solver_table_key(model_hash, config.num_steps, config.guidance,
                            config.guidance_interval, config.shift)
    have = ", ".join(sorted(tables)) or "none"
    raise ConfigError(f"no tuned solver table for {want} (steps, guidance, interval, shift; "
                      f"this bundle has: {have}); pass --steps of one of them, or {MAKE_ONE}")


def tuned_config(tables: Mapping[str, SolverTable], model_hash: str | None,
                 config: SamplerConfig) -> SamplerConfig:
    """``config`` (already carrying the call's steps, guidance, interval and shift) with the
    matching tuned table in place of its solver."""
    if model_hash is None:
        raise ConfigError(f"solver 'tuned' needs a bundle with tuned solver tables; {MAKE_ONE}")
    return find_solver_table(tables, model_hash, config).sampler_config(config)


def fast_table(tables: Mapping[str, SolverTable], model_hash: str | None,
               config: SamplerConfig, min_psnr_db: float) -> SolverTable | None:
    """The tuned table with the fewest steps, fitted at ``config``'s guidance, interval and
    shift, whose recorded held-out PSNR reaches ``min_psnr_db`` (the quality of the family's
    untuned few-step setting, so picking it never trades quality for speed); None when no
    table does."""
    fits = [t for t in tables.values()
            if model_hash is not None
            and t.matches(model_hash, replace(config, num_steps=t.nfe, timesteps=None))
            and float(t.heldout.get("psnr_db", -np.inf)) >= min_psnr_db]
    return min(fits, key=lambda t: t.nfe, default=None)
