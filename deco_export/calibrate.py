"""``deco calibrate``: StatisticDP schedules for DiT sharing.

A schedule says at which sampler evaluations the DiT runs; on the others the last condition is
reused (see ``runtimes.sharing``). StatisticDP picks those evaluations from a calibration run
that samples with the DiT at every evaluation and records how similar the conditions of any two
evaluations are. The run and the DP live in ``DeCoPipeline.calibrate_sharing``; this module adds
what a user needs around it: the model hash that keys the schedule, budget checks before minutes
of sampling, progress, the JSON file, the bundle manifest entry and a picture of the matrix.

A schedule is only valid for the model, step count, shift, guidance and budget K it was made for,
so it is stored under ``runtimes.schedule_key`` of exactly those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CalibrationReport",
    "calibrate",
    "check_budgets",
    "model_hash",
    "plot_similarity",
]


@dataclass
class CalibrationReport:
    """What `calibrate` did.

    similarity: the N x N mean token cosine matrix (N = model evaluations).
    schedules: key -> StatisticDP schedule, in the order of the budgets asked for.
    uniform_cost / dp_cost: key -> total reuse dissimilarity of the uniform schedule with the
        same K and of the DP schedule (lower is better; the DP is never worse by construction).
    json_path / plot_path: files written (plot None when not asked for).
    recorded: whether the schedules were recorded in a bundle's manifest.
    """

    similarity: np.ndarray
    schedules: dict[str, Any]
    uniform_cost: dict[str, float]
    dp_cost: dict[str, float]
    json_path: Path | None
    plot_path: Path | None
    recorded: bool
    model_hash: str


def model_hash(source: str | Path, pipe: Any) -> str:
    """The sha256 that keys a schedule: the weights the conditions came from.

    A bundle names its source checkpoint's hash in the manifest (``generate(sharing=key)`` then
    finds the schedule under the same key ``calibrate_sharing`` would use); a bundle without one
    falls back to its DiT graph's hash. A checkpoint directory has its weights' hash in its
    metadata; a reference ``.ckpt`` is hashed whole.
    """
    manifest = getattr(pipe, "manifest", None)
    if manifest is not None:
        sha = manifest.model_hash
        if sha:
            return sha
        raise ValueError(
            "this bundle's manifest names no source sha256 and no DiT graph hash; re-export it"
        )
    from runtimes.fileio import sha256_file

    from .checkpoint import read_metadata
    from .sources import model_path

    path = model_path(source)
    if path.is_dir():
        meta = read_metadata(path, missing_ok=True)
        sha = meta.get("weights_sha256")
        if not sha:
            raise ValueError(f"{path} has no weights_sha256 in metadata.json; re-save it")
        return str(sha)
    return sha256_file(path)


def check_budgets(budgets: Sequence[int | str], num_evaluations: int) -> list[int]:
    """Validate budgets K against the sampler's evaluation count before any sampling.

    Accepts ints or their CLI spelling ("25", "10,25"). Returns them deduplicated in the order
    given. K = N is allowed (no sharing, a useful baseline entry); K = 0 is not, because the
    first evaluation always runs the DiT.
    """
    values: list[int] = []
    for item in budgets:
        parts = item.replace(" ", "").split(",") if isinstance(item, str) else [item]
        for part in parts:
            if part == "":
                continue
            try:
                k = int(part)
                if k != float(part):
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(
                    f"budget {part!r} is not an integer; --budget K is the number of DiT runs "
                    f"per image, e.g. --budget 25"
                ) from None
            values.append(k)
    if not values:
        raise ValueError("give at least one --budget K (the number of DiT runs per image)")
    out: list[int] = []
    for k in values:
        if not 1 <= k <= num_evaluations:
            raise ValueError(
                f"budget K={k} is out of range: the sampler makes {num_evaluations} model "
                f"evaluations, so K must be in 1..{num_evaluations} (K = N means no sharing)"
            )
        if int(k) not in out:
            out.append(int(k))
    return out


def calibrate(
    source: str | Path,
    budgets: Sequence[int | str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    shift: float | None = None,
    solver: str | None = None,
    classes: Sequence[int] | None = None,
    batch_size: int = 4,
    seed: int = 0,
    mode: str = "reuse",
    backend: str | None = None,
    precision: str = "fp32",
    providers: str | None = None,
    device: str = "cpu",
    height: int | None = None,
    width: int | None = None,
    out: str | Path | None = "schedules.json",
    plot: str | Path | bool | None = None,
    record: bool = True,
    callback: Callable[[int, int, float], None] | None = None,
    pipe: Any = None,
) -> CalibrationReport:
    """Calibrate StatisticDP schedules for ``source`` (a bundle or a checkpoint).

    Budgets are checked against the evaluation count first, so a typo fails in a second rather
    than after the calibration run. Schedules go into the JSON file ``out`` (merged with the
    keys already there) and, for a bundle with ``record``, into the bundle's manifest, so that
    ``deco sample BUNDLE --sharing KEY`` finds them. ``plot`` writes the similarity matrix with
    the chosen DiT steps marked (True: next to ``out``, named after the key's prefix). ``pipe``
    reuses an open pipeline for ``source``.
    """
    from runtimes import record_schedule, save_schedule, uniform_schedule
    from runtimes.backend import supports_refresh
    from runtimes.sampler import make_plan
    from runtimes.sharing import SHARING_MODES, segment_cost

    from .sampling import open_pipeline
    from .sources import is_bundle

    if mode not in SHARING_MODES:
        raise ValueError(f"--mode must be one of {', '.join(SHARING_MODES)}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"--batch must be >= 1, got {batch_size}")
    if plot is True and out is None:
        raise ValueError("plot=True names the PNG after out=; give a plot path instead")
    if pipe is None:
        pipe = open_pipeline(source, backend=backend, precision=precision, providers=providers,
                             device=device)
    if mode == "fresh_t" and not supports_refresh(pipe.backend):
        raise ValueError(
            "mode 'fresh_t' needs a backend with the refresh graph (cached h and a timestep "
            "rebuild); re-export the bundle or use --mode reuse"
        )
    config = pipe.sampler_config(steps=steps, guidance=guidance, shift=shift, solver=solver,
                                 cfg_mode="reference")
    n_eval = make_plan(config).num_evaluations
    budgets = check_budgets(list(budgets), n_eval)
    num_classes = pipe.model_config.num_classes
    labels = list(range(num_classes)) if classes is None else list(classes)
    digest = model_hash(source, pipe)

    result = pipe.calibrate_sharing(
        labels, budgets, steps=config.num_steps, guidance=config.guidance, shift=config.shift,
        solver=config.solver, seed=seed, batch_size=batch_size, mode=mode, model_hash=digest,
        height=height, width=width, callback=callback,
    )
    sim = result.similarity
    dp_cost, uniform_cost = {}, {}
    for key, sched in result.schedules.items():
        dp_cost[key] = segment_cost(sim, sched.dit_steps)
        uniform = uniform_schedule(n_eval, ratio=1.0 - sched.budget / n_eval)
        uniform_cost[key] = segment_cost(sim, uniform.dit_steps)

    json_path = Path(out) if out is not None else None
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        for key, sched in result.schedules.items():
            save_schedule(json_path, key, sched)
    recorded = False
    if record and is_bundle(source):
        for key, sched in result.schedules.items():
            record_schedule(source, key, sched)
        recorded = True
    prefix = next(iter(result.schedules)).rsplit("-k", 1)[0]
    plot_path = None
    if plot is True:
        assert json_path is not None
        plot = json_path.with_name(f"{json_path.stem}-{prefix}.png")
    if plot:
        title = f"{prefix}  ({len(labels)} calibration samples, seed {seed})"
        plot_path = plot_similarity(sim, result.schedules, plot, title=title)
    return CalibrationReport(sim, dict(result.schedules), uniform_cost, dp_cost, json_path,
                             plot_path, recorded, digest)


def plot_similarity(
    similarity: np.ndarray,
    schedules: Mapping[str, Any],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """PNG of the similarity matrix with each schedule's DiT steps marked.

    The heatmap shows S[i, j] with the segments of the first schedule outlined (each square is
    a span over which one condition is reused); a strip below has one row per schedule with a
    tick at every evaluation that runs the DiT, on the same step axis, so budgets compare at a
    glance.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    s = np.asarray(similarity, dtype=np.float64)
    n = s.shape[0]
    items = list(schedules.items())
    rows = max(1, len(items))
    fig = Figure(figsize=(6.4, 6.4 + 0.28 * rows), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[6.0, 0.28 * rows + 0.5], width_ratios=[30, 1],
                            hspace=0.08, wspace=0.04)
    ax = fig.add_subplot(grid[0, 0])
    cax = fig.add_subplot(grid[0, 1])
    strip = fig.add_subplot(grid[1, 0], sharex=ax)
    im = ax.imshow(s, cmap="viridis", vmin=float(s.min()), vmax=1.0, origin="upper",
                   extent=(-0.5, n - 0.5, n - 0.5, -0.5), interpolation="nearest")
    fig.colorbar(im, cax=cax, label="mean token cosine")
    if items:
        steps = list(items[0][1].dit_steps)
        for a, b in zip(steps, steps[1:] + [n], strict=True):
            ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, lw=1.0,
                                   edgecolor="white"))
    ax.set_ylabel("evaluation i")
    ax.tick_params(labelbottom=False)
    ax.set_title(title, fontsize=9)
    for r, (_, sched) in enumerate(items):
        y = rows - 1 - r
        strip.scatter(list(sched.dit_steps), [y] * sched.budget, marker="|", s=60, c="C3")
    strip.set_yticks(range(rows))
    strip.set_yticklabels([f"K={sched.budget}" for _, sched in reversed(items)] or [""],
                          fontsize=8)
    strip.set_ylim(-0.6, rows - 0.4)
    strip.set_xlim(-0.5, n - 0.5)
    strip.set_xlabel("evaluation j (0 = noise); ticks: DiT runs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
