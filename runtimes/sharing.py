"""DiT sharing: run the DiT on some evaluations only and reuse its condition on the others.

DeCo's DiT costs ~97 % of a step and its pixel decoder ~3 %, so reusing the DiT output between
adjacent steps (as DDT does for its encoder) can cut latency several-fold. A schedule lists the
model evaluations at which the DiT runs (evaluation 0 always does); on the others the sampler
reuses the last condition ("reuse"), or caches the DiT's h and rebuilds cond = SiLU(e_t + h)
with the current timestep ("fresh_t", which needs a backend with a refresh graph).

Schedules come three ways: uniform (every k-th evaluation, or from a sharing ratio), an explicit
list, and StatisticDP (DDT, arXiv 2504.05741 §4.3): a calibration run records the condition at
every evaluation, `SimilarityAccumulator` reduces them to the N x N matrix of mean token cosine
similarities, and `statistic_dp` picks the K segment starts that keep each reused condition
closest to the one it replaces.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SHARING_MODES",
    "SharingSchedule",
    "SimilarityAccumulator",
    "dp_schedule",
    "explicit_schedule",
    "load_schedule",
    "resolve_sharing",
    "save_schedule",
    "schedule_key",
    "segment_cost",
    "statistic_dp",
    "uniform_schedule",
]

SHARING_MODES = ("reuse", "fresh_t")
SCHEDULES_FORMAT = "deco-sharing-schedules"
SCHEDULES_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SharingSchedule:
    """The evaluations at which the DiT runs.

    dit_steps: sorted evaluation indices, 0 included.
    num_steps: the number of evaluations the schedule was made for; the sampler refuses a
        schedule built for another length (a StatisticDP schedule is only optimal for its N).
    mode: "reuse" (keep the condition as is) or "fresh_t" (cache h, refresh the timestep).
    method / meta: provenance ("uniform", "explicit", "statistic_dp"), kept in saved schedules.
    """

    dit_steps: tuple[int, ...]
    num_steps: int
    mode: str = "reuse"
    method: str = "explicit"
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in SHARING_MODES:
            raise ValueError(f"sharing mode must be one of {SHARING_MODES}, got {self.mode!r}")
        if self.num_steps < 1:
            raise ValueError(f"a sharing schedule needs num_steps >= 1, got {self.num_steps}")
        steps = sorted({int(s) for s in self.dit_steps} | {0})
        bad = [s for s in steps if not 0 <= s < self.num_steps]
        if bad:
            raise ValueError(
                f"sharing schedule steps {bad} are outside 0..{self.num_steps - 1}; list the "
                f"evaluations (0-based) at which the DiT should run"
            )
        object.__setattr__(self, "dit_steps", tuple(steps))

    @property
    def budget(self) -> int:
        """K, the number of DiT runs."""
        return len(self.dit_steps)

    @property
    def ratio(self) -> float:
        """Sharing ratio r = 1 - K / N."""
        return 1.0 - self.budget / self.num_steps

    def mask(self, num_evaluations: int) -> np.ndarray:
        """Boolean per evaluation: True where the DiT runs."""
        if num_evaluations != self.num_steps:
            raise ValueError(
                f"this sharing schedule was made for {self.num_steps} model evaluations but the "
                f"sampler makes {num_evaluations}; build it for the same steps and solver"
            )
        m = np.zeros(num_evaluations, dtype=bool)
        m[list(self.dit_steps)] = True
        return m

    def with_mode(self, mode: str) -> SharingSchedule:
        return SharingSchedule(self.dit_steps, self.num_steps, mode, self.method, dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dit_steps": list(self.dit_steps),
            "num_steps": self.num_steps,
            "mode": self.mode,
            "method": self.method,
            **{k: v for k, v in self.meta.items() if k not in ("dit_steps", "num_steps")},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SharingSchedule:
        core = ("dit_steps", "num_steps", "mode", "method")
        return cls(
            dit_steps=tuple(d["dit_steps"]),
            num_steps=int(d["num_steps"]),
            mode=d.get("mode", "reuse"),
            method=d.get("method", "explicit"),
            meta={k: v for k, v in d.items() if k not in core},
        )


def uniform_schedule(
    num_steps: int, *, every: int | None = None, ratio: float | None = None, mode: str = "reuse"
) -> SharingSchedule:
    """Recompute every ``every``-th evaluation, or K = round((1 - ratio) N) evenly spaced ones.

    ratio 0 runs the DiT at every evaluation; 0.5 every second; 0.75 every fourth; 0.8 every
    fifth (the DDT table's settings).
    """
    if (every is None) == (ratio is None):
        raise ValueError("give exactly one of every= (recompute period) or ratio= (0 <= r < 1)")
    if every is not None:
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        return SharingSchedule(tuple(range(0, num_steps, int(every))), num_steps, mode, "uniform",
                               {"every": int(every)})
    assert ratio is not None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sharing ratio must be in [0, 1), got {ratio}")
    k = max(1, min(num_steps, round((1.0 - ratio) * num_steps)))
    steps = sorted({(j * num_steps) // k for j in range(k)})
    return SharingSchedule(tuple(steps), num_steps, mode, "uniform", {"ratio": float(ratio)})


def explicit_schedule(
    steps: Iterable[int], num_steps: int, *, mode: str = "reuse"
) -> SharingSchedule:
    """A schedule from a list of evaluation indices (0 is added if missing)."""
    return SharingSchedule(tuple(int(s) for s in steps), num_steps, mode, "explicit")


def _segment_costs(similarity: np.ndarray) -> np.ndarray:
    """E[i, j] = sum_{l=j..i} (1 - S[l, j]) for i >= j: the cost of reusing step j's condition
    for steps j..i (a cumulative column sum of 1 - S)."""
    d = 1.0 - np.asarray(similarity, dtype=np.float64)
    prefix = np.cumsum(d, axis=0)  # prefix[i, j] = sum_{l<=i} d[l, j]
    before = np.vstack([np.zeros((1, d.shape[1])), prefix[:-1]])  # sum_{l<i}
    cost: np.ndarray = prefix - np.diag(before)[None, :]
    return cost


def segment_cost(similarity: np.ndarray, starts: Sequence[int]) -> float:
    """Total dissimilarity of a schedule: sum over segments of sum_l (1 - S[l, start])."""
    s = np.asarray(similarity, dtype=np.float64)
    n = s.shape[0]
    bounds = list(starts) + [n]
    return float(sum((1.0 - s[a:b, a]).sum() for a, b in itertools.pairwise(bounds)))


def statistic_dp(similarity: np.ndarray, budget: int) -> list[int]:
    """StatisticDP: the K segment starts (0 forced) that minimise total reuse dissimilarity.

    ``similarity`` is the N x N matrix S[i, j] = mean token cosine between the conditions at
    evaluations i and j (only S[l, j] with l >= j is read). Minimising
    sum_k sum_{l in segment k} (1 - S[l, start_k]) equals maximising the summed similarity of
    every step to its segment's first step. C_k(i), the best cost of covering steps 0..i-1 with
    k segments, obeys C_k(i) = min_{k-1 <= j < i} C_{k-1}(j) + E(i-1, j); O(K N^2) in all,
    vectorised over j. Ties go to the earliest start.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
        raise ValueError(f"similarity must be a square N x N matrix, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("similarity matrix contains NaN or inf; recalibrate")
    n = s.shape[0]
    if int(budget) != budget or not 1 <= budget <= n:
        raise ValueError(f"budget K must be an integer in 1..{n}, got {budget!r}")
    budget = int(budget)
    e = _segment_costs(s)  # e[i, j], valid for i >= j
    inf = np.inf
    # cost[k][i]: best cost covering steps 0..i-1 with k+1 segments; i = 0..n.
    cost = np.full((budget, n + 1), inf)
    arg = np.zeros((budget, n + 1), dtype=np.int64)
    cost[0, 1:] = e[np.arange(n), 0]
    # last[j, i] = E(i - 1, j) for a last segment starting at j and ending at i - 1 (j < i).
    last = np.full((n, n + 1), inf)
    ii, jj = np.triu_indices(n)  # jj >= ii -> segment start ii, end jj
    last[ii, jj + 1] = e[jj, ii]
    for k in range(1, budget):
        total = cost[k - 1][:n, None] + last  # (j, i)
        total[: k, :] = inf  # the first k segments need at least k steps: j >= k
        arg[k] = np.argmin(total, axis=0)
        cost[k] = total[arg[k], np.arange(n + 1)]
    starts = []
    i = n
    for k in range(budget - 1, 0, -1):
        j = int(arg[k, i])
        starts.append(j)
        i = j
    starts.append(0)
    return sorted(starts)


def dp_schedule(
    similarity: np.ndarray, budget: int, *, mode: str = "reuse", **meta: Any
) -> SharingSchedule:
    """`statistic_dp` wrapped as a schedule (meta such as the key is kept with it)."""
    steps = statistic_dp(similarity, budget)
    n = int(np.asarray(similarity).shape[0])
    meta = {"budget": int(budget), "cost": segment_cost(similarity, steps), **meta}
    return SharingSchedule(tuple(steps), n, mode, "statistic_dp", meta)


class SimilarityAccumulator:
    """Accumulates S[i, j] = mean over tokens of cos(cond_i, cond_j) across calibration runs.

    A run feeds the condition of every evaluation in order (``add(0, c0)``, ``add(1, c1)``, ...);
    each arrives as (B, L, D) or (T, D) and is L2-normalised per token over D. Row i is computed
    against the stored conditions of the same run in blocks of ``block`` steps, and summed into a
    float64 N x N total, so no (tokens x N x N) tensor ever exists. Memory is one run's
    normalised conditions: N x T x D x itemsize (``store_dtype`` float16 by default halves it;
    the cosine error that adds is ~1e-4, far below what changes a schedule); ``spill_dir`` keeps
    them in a memory-mapped file instead of RAM. Split a large calibration into several runs of
    a few samples each: the mean over all tokens decomposes over runs.
    """

    def __init__(
        self,
        num_steps: int,
        *,
        block: int = 8,
        store_dtype: Any = np.float16,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        self.block = max(1, int(block))
        self.store_dtype = np.dtype(store_dtype)
        self.spill_dir = spill_dir
        self.sums = np.zeros((self.num_steps, self.num_steps), dtype=np.float64)
        self.tokens = 0  # tokens per step accumulated over finished runs
        self.runs = 0
        self._store: np.ndarray | None = None
        self._spill_path: str | None = None
        self._next = 0
        self._run_tokens = 0

    def _open_store(self, tokens: int, dim: int) -> np.ndarray:
        shape = (self.num_steps, tokens, dim)
        if self.spill_dir is None:
            return np.empty(shape, dtype=self.store_dtype)
        fd, path = tempfile.mkstemp(suffix=".sim", dir=self.spill_dir)
        os.close(fd)
        self._spill_path = path
        return np.memmap(path, dtype=self.store_dtype, mode="w+", shape=shape)

    def _close_store(self) -> None:
        self._store = None
        if self._spill_path is not None:
            os.unlink(self._spill_path)
            self._spill_path = None

    def add(self, step: int, cond: Any) -> None:
        """Add the condition of evaluation ``step`` of the current run (steps in order)."""
        if step == 0 and self._next != 0:
            raise ValueError(
                f"a new calibration run started at step 0 while the previous one stopped at "
                f"step {self._next - 1} of {self.num_steps}; feed every step of a run"
            )
        if step != self._next:
            raise ValueError(f"expected the condition of step {self._next}, got step {step}")
        a = np.asarray(cond, dtype=np.float32)
        a = a.reshape(-1, a.shape[-1])
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        a = a / np.maximum(norms, 1e-12)
        if step == 0:
            self._store = self._open_store(a.shape[0], a.shape[1])
            self._run_tokens = a.shape[0]
        assert self._store is not None
        if a.shape != self._store.shape[1:]:
            raise ValueError(
                f"step {step} has {a.shape[0]} tokens of width {a.shape[1]} but step 0 had "
                f"{self._store.shape[1]} of width {self._store.shape[2]}: calibrate with "
                f"cfg_mode='reference' so every step has the same batch"
            )
        self._store[step] = a
        cur = np.asarray(self._store[step], dtype=np.float32)  # as stored, so S stays symmetric
        row = self.sums[step]
        for lo in range(0, step + 1, self.block):
            hi = min(step + 1, lo + self.block)
            prev = np.asarray(self._store[lo:hi], dtype=np.float32)
            dots = np.einsum("btd,td->bt", prev, cur)
            row[lo:hi] += dots.sum(axis=1, dtype=np.float64)
        self.sums[: step, step] = row[: step]
        self._next = step + 1
        if self._next == self.num_steps:
            self.tokens += self._run_tokens
            self.runs += 1
            self._next = 0
            self._close_store()

    @property
    def matrix(self) -> np.ndarray:
        """The mean cosine matrix (N x N) over all finished runs."""
        if self.tokens == 0:
            raise ValueError("no finished calibration run yet: add the conditions of all steps")
        return self.sums / self.tokens

    def __del__(self) -> None:
        try:
            self._close_store()
        except Exception:
            pass


def schedule_key(
    model_hash: str,
    num_steps: int,
    shift: float,
    guidance: float,
    budget: int,
    solver: str = "euler",
) -> str:
    """Key under which a calibrated schedule is stored: a schedule is only valid for the model,
    step count, shift and guidance it was calibrated with, and its budget K (and the solver,
    which is named in the key unless it is Euler, since it sets the number of evaluations)."""
    key = f"{model_hash[:16]}-n{int(num_steps)}-s{shift:g}-g{guidance:g}-k{int(budget)}"
    return key if solver == "euler" else f"{key}-{solver}"


def _read_schedules(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it and recalibrate") from exc
    if data.get("format") != SCHEDULES_FORMAT:
        raise ValueError(f"{path}: not a sharing schedule file (format {data.get('format')!r})")
    if data.get("format_version", 0) > SCHEDULES_FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer version; upgrade to read it")
    return data


def save_schedule(path: str | os.PathLike[str], key: str, schedule: SharingSchedule) -> None:
    """Store ``schedule`` under ``key`` in the JSON file ``path`` (other keys are kept; the file
    is replaced atomically)."""
    from runtimes.fileio import atomic_write_text

    path = Path(path)
    data: dict[str, Any] = {
        "format": SCHEDULES_FORMAT,
        "format_version": SCHEDULES_FORMAT_VERSION,
        "schedules": {},
    }
    if path.exists():
        data = _read_schedules(path)
    data["schedules"][key] = schedule.to_dict()
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def load_schedule(path: str | os.PathLike[str], key: str) -> SharingSchedule:
    """The schedule stored under ``key`` in ``path``; the error lists the keys present."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no schedule file; run a calibration to create it")
    schedules = _read_schedules(path).get("schedules", {})
    if key not in schedules:
        have = ", ".join(sorted(schedules)) or "none"
        raise KeyError(
            f"{path} has no schedule {key!r} (has: {have}); calibrate for this model, step "
            f"count, shift, guidance and budget"
        )
    return SharingSchedule.from_dict(schedules[key])


def resolve_sharing(
    spec: Any, num_evaluations: int, schedules: Mapping[str, Mapping[str, Any]] | None = None
) -> SharingSchedule | None:
    """Turn a user-facing sharing spec into a schedule for ``num_evaluations`` evaluations.

    None -> no sharing; a `SharingSchedule` -> itself; a number -> uniform sharing ratio; a list
    of ints -> explicit DiT steps; a string -> a calibrated schedule by key (from ``schedules``,
    e.g. the bundle manifest's); a dict -> {"ratio": r} / {"every": k} / {"steps": [...]} or a
    stored schedule, each with an optional "mode".
    """
    if spec is None:
        return None
    if isinstance(spec, SharingSchedule):
        return spec
    if isinstance(spec, bool):
        raise ValueError("sharing=True is ambiguous: give a ratio (e.g. 0.5) or a schedule")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return uniform_schedule(num_evaluations, ratio=float(spec))
    if isinstance(spec, str):
        table = schedules or {}
        if spec not in table:
            have = ", ".join(sorted(table)) or "none"
            raise ValueError(
                f"unknown sharing schedule {spec!r} (this bundle has: {have}); run "
                f"`deco calibrate` to add one, or pass a ratio such as 0.5"
            )
        return SharingSchedule.from_dict(table[spec])
    if isinstance(spec, Mapping):
        mode = spec.get("mode", "reuse")
        if "dit_steps" in spec:
            return SharingSchedule.from_dict(spec)
        if "ratio" in spec:
            return uniform_schedule(num_evaluations, ratio=float(spec["ratio"]), mode=mode)
        if "every" in spec:
            return uniform_schedule(num_evaluations, every=int(spec["every"]), mode=mode)
        if "steps" in spec:
            return explicit_schedule(spec["steps"], num_evaluations, mode=mode)
        raise ValueError(
            "a sharing dict needs one of 'ratio', 'every', 'steps' or 'dit_steps' (and optionally "
            "'mode': 'reuse' or 'fresh_t')"
        )
    if isinstance(spec, Iterable):
        steps = list(spec)
        if not all(isinstance(s, (int, np.integer)) for s in steps):
            raise ValueError("an explicit sharing schedule is a list of integer evaluation indices")
        return explicit_schedule(steps, num_evaluations)
    raise ValueError(f"cannot use {type(spec).__name__} as a sharing schedule")
