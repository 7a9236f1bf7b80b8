"""``deco calibrate BUNDLE --solver --nfe ...``: coefficient tables tuned for a bundle's model.

The coefficient-table solver (`runtimes.solvers.Table`) takes N time deltas and a strictly
lower-triangular N x N table. Here both are fitted to the bundle's own model: gradient descent
(Adam) through the frozen PyTorch model, N-step student against a many-step teacher from the
same noise and condition, on calibration noises and labels (or prompts) only. The parameters
are N + N (N - 1) / 2 (55 at N = 10):

* the time deltas, as a softmax over logits inside each segment between the edges of the
  guidance interval, so they stay positive, every edge stays a step boundary (the guidance of
  each step is the one it was fitted with) and they sum to 1;
* the table, started at variable-step Adams-Bashforth 2 with guidance edges (AB2 on the same
  grid, history restarted at the edges) or at Euler (all zeros), whichever is closer to the
  teacher on the calibration set, so the fit starts from a good solver; the best iterate on
  the calibration loss is kept.

The error the bundle records is measured after the fit, through the bundle's runtime, on
held-out noises and labels or prompts the fit never saw, against the teacher, next to AB2 and
Euler (both with guidance edges) at the same NFE; ``deco validate`` measures it again
(`recheck_solver_tables`). Tables go into the manifest through `BundleTransaction`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.noise import noise_for_keys
from runtimes.sampler import SamplerConfig, edge_timesteps, make_plan
from runtimes.solver_tables import TUNED, SolverTable
from runtimes.solvers import adams_bashforth_table

from .parity import sample_accuracy

__all__ = [
    "CALIBRATION_PROMPTS",
    "HELDOUT_PROMPTS",
    "TableFit",
    "fit_table",
    "heldout_error",
    "parse_nfe",
    "recheck_solver_tables",
    "tune_solver_tables",
]

# Noise seeds (runtimes.noise keys (seed, i)): the fit's and the recorded held-out error's.
# scripts/studies/solver_study.py measures on seed 1, which neither uses.
CALIBRATION_SEED = 10
HELDOUT_SEED = 11
# Emoji names (CLDR short names) for text-to-image: the fit's and the held-out ones (disjoint,
# and disjoint from scripts/studies/solver_study.py's).
CALIBRATION_PROMPTS = ("smiling face", "winking face", "blue heart", "banana", "crescent moon",
                       "christmas tree", "cloud", "house", "automobile", "sunflower",
                       "hot beverage", "birthday cake", "panda", "rainbow", "soccer ball",
                       "trophy")
HELDOUT_PROMPTS = ("grinning squinting face", "yellow heart", "strawberry", "umbrella",
                   "penguin", "rose", "lemon", "light bulb")
# The teacher: Heun with guidance edges (second order, 2N - 1 evaluations); at 64 steps it is
# about 59 dB (c2i) and 53 dB (t2i) from the exact solution on the embedded models
# (docs/sampling.md), far below any few-step error.
TEACHER_STEPS = 64
# deco validate accepts a remeasured held-out PSNR this much below the recorded one (runtimes
# and CPUs round differently; a changed table moves it by whole dB).
RECHECK_TOLERANCE_DB = 0.5
# The fit's learning-rate schedules (`fit_table`).
SCHEDULES = ("cosine", "constant")
# The command's fit: at 8 NFE on the c2i default, 16 samples and 150 iterations (with the split
# search) reach 32.4 dB on the solver study's 64 held-out noises, where 8 samples and 24
# iterations at the proportional split reached 29.6 (docs/sampling.md); about 16 minutes of one
# core at 8 NFE.
FIT_SAMPLES = 16
FIT_ITERATIONS = 150


def parse_nfe(text: str | Sequence[int]) -> list[int]:
    """'5,6,8,10' (or ints) as step counts >= 2, deduplicated in order."""
    parts = text.replace(" ", "").split(",") if isinstance(text, str) else list(text)
    out: list[int] = []
    for part in parts:
        if part == "":
            continue
        try:
            n = int(part)
        except ValueError:
            raise ValueError(f"--nfe {part!r} is not an integer; write e.g. --nfe 5,6,8,10"
                             ) from None
        if not 2 <= n <= 50:
            raise ValueError(f"--nfe {n} is out of range: a tuned table has 2 to 50 steps")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("give the step counts to tune, e.g. --nfe 5,6,8,10")
    return out


@dataclass
class Conditions:
    """The labels or encoded prompts of a set of samples, as the pipeline and the model take
    them: ``generate`` keywords and the model's cond / uncond tensors."""

    generate: dict[str, Any]
    record: dict[str, Any]


def _conditions(pipe: Any, count: int, calibration: bool) -> Conditions:
    cfg = pipe.model_config
    if not cfg.is_text_to_image:
        offset = 0 if calibration else 1  # the held-out labels start one class later
        labels = [(i + offset) % cfg.num_classes for i in range(count)]
        return Conditions({"class_labels": labels}, {"labels": labels})
    names = CALIBRATION_PROMPTS if calibration else HELDOUT_PROMPTS
    prompts = [names[i % len(names)] for i in range(count)]
    return Conditions({"prompt": prompts}, {"prompts": prompts})


def _open(bundle: Path, backend: str, **options: Any) -> Any:
    """The bundle's pipeline; a text-to-image bundle exported without its text encoder
    borrows the one its source checkpoint records (prompts are part of the held-out set)."""
    import runtimes

    pipe = runtimes.load(bundle, backend=backend, **options)
    cfg = pipe.model_config
    source = (pipe.manifest.source or {}).get("path") if pipe.manifest else None
    if cfg.is_text_to_image and pipe.text_encoder is None and source:
        from .sources import model_path
        from .text_encoders import LazyTextEncoder, recorded_text_encoder

        name = recorded_text_encoder(model_path(source))
        if name:
            pipe.text_encoder = LazyTextEncoder(name, cfg.text_len, cfg.text_dim)
    return pipe


def _noise(pipe: Any, seed: int, count: int) -> np.ndarray:
    cfg = pipe.model_config
    return noise_for_keys([(seed, i) for i in range(count)], (cfg.in_channels, *cfg.image_size))


def _generate(pipe: Any, cond: dict[str, Any], noise: np.ndarray, **settings: Any) -> np.ndarray:
    out = pipe.generate(**cond, noise=noise, output_type="np", **settings)
    return np.asarray(out.images, dtype=np.float64)


def _psnr(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean per-image PSNR, data range 2; largest absolute error)."""
    figures = sample_accuracy(images, reference)
    return figures["psnr_mean"], figures["max_abs"]


def _teacher_settings(steps: int) -> dict[str, Any]:
    return {"solver": "heun", "steps": int(steps), "guidance_edges": True}


def heldout_error(pipe: Any, table: SolverTable, teacher: np.ndarray | None = None
                  ) -> tuple[float, float, np.ndarray]:
    """The tuned table's (mean PSNR, largest error) against the teacher on the held-out set
    its record names, through ``pipe`` (solver "tuned", so the bundle's lookup is part of
    what is measured), and the teacher's images (computed unless given)."""
    h = table.heldout
    cond = {"class_labels": list(h["labels"])} if "labels" in h else {
        "prompt": list(h["prompts"])}
    noise = _noise(pipe, int(h["seed"]), int(h["noises"]))
    if teacher is None:
        teacher = _generate(pipe, cond, noise, **_teacher_settings(int(h["teacher"]["steps"])))
    settings = {"guidance": table.guidance, "guidance_interval": table.guidance_interval,
                "shift": table.shift}
    images = _generate(pipe, cond, noise, solver=TUNED, steps=table.nfe, **settings)
    psnr, worst = _psnr(images, teacher)
    return psnr, worst, teacher


# ---------------------------------------------------------------------------------------------
# The fit (PyTorch)


@dataclass
class TableFit:
    """A fitted grid and table, with the calibration loss before and after."""

    timesteps: tuple[float, ...]
    coefficients: tuple[tuple[float, ...], ...]
    loss_start: float
    loss_best: float
    init: str
    iterations: int
    seconds: float
    split: tuple[int, ...] = ()


def _segments(grid: np.ndarray, interval: tuple[float, float]) -> list[tuple[int, int]]:
    """(first step, end step) of each run of steps between guidance edges on ``grid``."""
    cuts = [0]
    for edge in sorted(float(e) for e in interval if 0.0 < float(e) < 1.0):
        k = int(np.argmin(np.abs(grid.astype(np.float64) - edge)))
        if 0 < k < grid.size - 1 and k not in cuts:
            cuts.append(k)
    cuts.append(grid.size - 1)
    return list(itertools.pairwise(cuts))


def split_grid(config: SamplerConfig, split: Sequence[int] | None) -> tuple[float, ...] | None:
    """The guidance-edge grid of ``config`` with ``split[k]`` steps in segment k (None: the
    proportional split `edge_timesteps` makes)."""
    if split is None:
        return None
    grid = edge_timesteps(config.num_steps, config.shift, config.guidance_interval, split)
    return tuple(float(t) for t in grid)


def default_split(config: SamplerConfig) -> tuple[int, ...]:
    """Steps per segment between guidance edges on the proportional guidance-edge grid."""
    grid = edge_timesteps(config.num_steps, config.shift, config.guidance_interval)
    return tuple(e - a for a, e in _segments(grid, config.guidance_interval))


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"learning-rate schedule {schedule!r} is not one of "
                         f"{', '.join(SCHEDULES)}")


def fit_table(model: Any, config: SamplerConfig, noise: np.ndarray, cond: Any, uncond: Any,
              teacher: np.ndarray, *, iterations: int = 24, lr: float = 0.05,
              split: Sequence[int] | None = None, schedule: str = "cosine",
              callback: Callable[[int, int, float], None] | None = None) -> TableFit:
    """Fit the time deltas and the table of ``config`` (guidance edges on, ``num_steps`` N)
    so the N-step table solver from ``noise`` lands on ``teacher``: Adam on the mean squared
    error of the final images through the frozen ``model`` (cond / uncond: its y inputs, the
    labels with the null class or the text features). Keeps the best iterate seen.

    ``split``: steps per run between guidance edges (None: the proportional grid's); the fit
    moves times only inside each run. ``schedule``: "cosine" decays the learning rate to 5 %
    of ``lr`` over the iterations (the late, small steps are where the best iterate is found),
    "constant" keeps it."""
    import torch

    _check_schedule(schedule)
    config = replace(config, solver="ab2", guidance_edges=True,
                     timesteps=split_grid(config, split), coefficients=None)
    plan = make_plan(config)
    grid = plan.grid.astype(np.float64)
    n = plan.num_steps
    guided = [ev.guided for ev in plan.evaluations]
    w = float(config.guidance)
    segments = _segments(plan.grid, config.guidance_interval)
    init = adams_bashforth_table(plan.grid, 2, plan.restarts)
    logits = [torch.tensor(np.log(np.diff(grid[a:b + 1]) / (grid[b] - grid[a])),
                           dtype=torch.float64, requires_grad=True) for a, b in segments]
    rows, cols = np.tril_indices(n, -1)
    table = torch.tensor(init[rows, cols], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([{"params": logits, "lr": lr}, {"params": [table], "lr": lr}])
    decay = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(iterations, 1),
                                                        eta_min=0.05 * lr)
             if schedule == "cosine" else None)
    x0 = torch.from_numpy(np.ascontiguousarray(noise, np.float32))
    target = torch.from_numpy(np.asarray(teacher, np.float32))
    y_c = torch.as_tensor(cond)
    y_u = torch.as_tensor(uncond)
    if y_u.shape[0] != y_c.shape[0]:
        y_u = y_u.expand(y_c.shape[0], *y_u.shape[1:])
    y_both = torch.cat([y_u, y_c])
    b = x0.shape[0]
    for p in model.parameters():
        p.requires_grad_(False)

    def grid_of() -> tuple[Any, Any]:
        """(times t_0..t_N, deltas) from the logits, every segment's ends fixed."""
        dts = torch.cat([(grid[e] - grid[a]) * torch.softmax(lg, 0)
                         for (a, e), lg in zip(segments, logits, strict=True)])
        times = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(dts, 0)])
        return times, dts

    def coefficient_matrix() -> Any:
        c = torch.zeros(n, n, dtype=torch.float64)
        return c.index_put((torch.from_numpy(rows), torch.from_numpy(cols)), table)

    def velocity(x: Any, t: Any, i: int) -> Any:
        if guided[i] and w != 1.0:
            out = model(torch.cat([x, x]), t.expand(2 * b), y_both)
            return out[:b] + (out[b:] - out[:b]) * w
        return model(x, t.expand(b), y_c)

    with torch.no_grad():  # the first evaluation (the noise at t = 0) depends on no parameter
        v_first = velocity(x0, torch.zeros((), dtype=torch.float32), 0)

    def solve() -> Any:
        times, dts = grid_of()
        c = coefficient_matrix().float()
        x, vs = x0, []
        for i in range(n):
            v = v_first if i == 0 else velocity(x, times[i].float(), i)
            vs.append(v)
            vbar = v * (1.0 - c[i, :i].sum())
            for j in range(i):
                vbar = vbar + vs[j] * c[i, j]
            x = x + vbar * dts[i].float()
        return x

    def snapshot() -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
        with torch.no_grad():
            times, _ = grid_of()
            t = times.numpy().copy()
            for a, e in segments:  # the edges exactly as the runtime grid has them
                t[a], t[e] = grid[a], grid[e]
            t[0], t[-1] = 0.0, 1.0
            c = coefficient_matrix().numpy()
        # float32, as the runtime's grid holds them: the record is what runs
        times = tuple(float(v) for v in t.astype(np.float32))
        return times, tuple(tuple(float(v) for v in r) for r in c)

    start = time.perf_counter()
    with torch.no_grad():  # start from AB2 or Euler, whichever lands closer (Euler at 4 steps
        ab2_loss = float(torch.mean((solve() - target) ** 2))  # on a shifted grid, often)
        table.zero_()
        start_from = "euler"
        if float(torch.mean((solve() - target) ** 2)) > ab2_loss:
            table.copy_(torch.from_numpy(init[rows, cols]))
            start_from = "ab2 guidance_edges"
    best = (float("inf"), snapshot())
    first = float("nan")
    for it in range(iterations + 1):
        optimizer.zero_grad()
        loss = torch.mean((solve() - target) ** 2)
        value = float(loss.detach())
        if it == 0:
            first = value
        if value < best[0] and np.all(np.diff(np.float32(snapshot()[0])) > 0):
            best = (value, snapshot())
        if callback is not None:
            callback(it, iterations, value)
        if it == iterations:
            break
        loss.backward()
        optimizer.step()
        if decay is not None:
            decay.step()
    (t_best, c_best) = best[1]
    return TableFit(t_best, c_best, first, best[0], start_from, iterations,
                    time.perf_counter() - start, tuple(e - a for a, e in segments))


def search_split(screen: Callable[[tuple[int, ...]], float], start: tuple[int, ...]
                 ) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
    """The steps per run between guidance edges with the lowest ``screen`` loss (a short fit
    at that split), by hill climbing from ``start``: move one step between two neighbouring
    runs while that lowers the loss. Returns the split and every loss tried.

    The fit moves times only inside each run (every edge stays a boundary), so the split is
    the one choice gradient descent cannot make; a jump in the velocity field makes it matter
    (c2i at 8 NFE: how many of the steps go below t = 0.1)."""
    tried = {start: screen(start)}
    current = start
    while True:
        for k in range(len(current) - 1):
            for move in (1, -1):
                split = list(current)
                split[k] += move
                split[k + 1] -= move
                if min(split) >= 1 and tuple(split) not in tried:
                    tried[tuple(split)] = screen(tuple(split))
        best = min(tried, key=lambda c: tried[c])
        if best == current:
            return current, tried
        current = best


def _model_inputs(pipe: Any, model: Any, cond: Conditions) -> tuple[Any, Any]:
    """The model's y for the conditional and the unconditional half."""
    cfg = model.config
    if not cfg.is_text_to_image:
        labels = np.asarray(cond.generate["class_labels"], np.int64)
        return labels, np.full_like(labels, cfg.null_class)
    text, negative = pipe.text_conditions(cond.generate["prompt"], None, None, None)
    return np.asarray(text, np.float32), np.asarray(negative, np.float32)


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class TuningReport:
    """What `tune_solver_tables` did: the tables (by key), the model hash, the bundle."""

    tables: dict[str, SolverTable]
    model_hash: str
    bundle: Path


def tune_solver_tables(
    bundle: str | Path, nfes: Sequence[int] | str, *, samples: int = FIT_SAMPLES,
    heldout: int = 8, iterations: int = FIT_ITERATIONS, lr: float = 0.05,
    teacher_steps: int = TEACHER_STEPS,
    schedule: str = "cosine", split_search: bool = True, screen_iterations: int = 12,
    guidance: float | None = None, shift: float | None = None, backend: str = "onnxruntime",
    checkpoint: str | None = None, record: bool = True,
    progress: Callable[[str, int, int, float], None] | None = None,
    say: Callable[[str], None] | None = None, **backend_options: Any,
) -> TuningReport:
    """Fit one table per NFE for ``bundle``'s model at its default guidance, interval and
    shift (or the given guidance / shift), measure each on held-out noises through the
    bundle's ``backend`` against the teacher and against AB2 and Euler with guidance edges,
    and record them in the manifest (``record``). ``progress(what, i, total, loss)`` sees every
    iteration.

    Where the guidance interval has an edge inside (0, 1), ``split_search`` first picks how
    many steps each run between edges gets (`search_split`: ``screen_iterations`` of the fit on
    at most 8 of the calibration samples per split tried), then fits at that split."""
    from runtimes import bundle as rb
    from runtimes.cpu import cpu_model

    from .sources import bundle_source_model

    nfes = parse_nfe(nfes)
    if samples < 1 or heldout < 1:
        raise ValueError("--samples and --heldout must be at least 1")
    _check_schedule(schedule)  # before the teacher's minutes, not after
    note = say or (lambda _m: None)
    root = Path(bundle)
    manifest = rb.read_manifest(root)
    digest = manifest.model_hash
    if digest is None:
        raise rb.BundleError(f"{root}: the manifest names no source sha256 and no DiT graph "
                             "hash, which key a tuned table; export the bundle again")
    model = bundle_source_model(root, manifest, checkpoint)
    pipe = _open(root, backend, **backend_options)
    try:
        base = pipe.sampler_config(guidance=guidance, shift=shift)
        calib = _conditions(pipe, samples, calibration=True)
        held = _conditions(pipe, heldout, calibration=False)
        calib_noise = _noise(pipe, CALIBRATION_SEED, samples)
        held_noise = _noise(pipe, HELDOUT_SEED, heldout)
        settings = {"guidance": base.guidance, "shift": base.shift}
        note(f"teacher: Heun {teacher_steps} steps with guidance edges on {samples} "
             f"calibration and {heldout} held-out samples")
        teacher = _teacher_settings(teacher_steps)
        calib_teacher = _generate(pipe, calib.generate, calib_noise, **teacher, **settings)
        held_teacher = _generate(pipe, held.generate, held_noise, **teacher, **settings)
        y_c, y_u = _model_inputs(pipe, model, calib)
        tables: dict[str, SolverTable] = {}
        for n in nfes:
            config = replace(base, num_steps=n, timesteps=None)

            def callback(i: int, total: int, loss: float, n: int = n) -> None:
                if progress is not None:
                    progress(f"NFE {n}", i, total, loss)

            split = default_split(config)
            screened: dict[tuple[int, ...], float] = {}
            if split_search and len(split) > 1 and screen_iterations > 0:
                m = min(samples, 8)

                def screen(at: tuple[int, ...], n: int = n, m: int = m,
                           config: SamplerConfig = config) -> float:
                    fit = fit_table(model, config, calib_noise[:m], y_c[:m], y_u[:m],
                                    calib_teacher[:m], iterations=screen_iterations, lr=lr,
                                    split=at, schedule=schedule)
                    note(f"NFE {n}: steps per run {at}: screened loss {fit.loss_best:.3e}")
                    return fit.loss_best

                split, screened = search_split(screen, split)
            fit = fit_table(model, config, calib_noise, y_c, y_u, calib_teacher,
                            iterations=iterations, lr=lr, split=split, schedule=schedule,
                            callback=callback)
            baselines = {}
            for solver in ("ab2", "euler"):
                images = _generate(pipe, held.generate, held_noise, solver=solver, steps=n,
                                   guidance_edges=True, **settings)
                baselines[f"{solver} guidance_edges"] = round(_psnr(images, held_teacher)[0], 3)
            record_h = {"noises": heldout, "seed": HELDOUT_SEED, **held.record,
                        "teacher": {"solver": "heun", "steps": teacher_steps,
                                    "guidance_edges": True},
                        "baselines": baselines, "backend": backend, "cpu": cpu_model()}
            table = SolverTable(
                model_sha256=digest, nfe=n, guidance=base.guidance,
                guidance_interval=base.guidance_interval, shift=base.shift,
                timesteps=fit.timesteps, coefficients=fit.coefficients, heldout=record_h,
                fit={"samples": samples, "seed": CALIBRATION_SEED, "iterations": iterations,
                     "lr": lr, "schedule": schedule, "init": fit.init,
                     "split": list(fit.split),
                     "screened": {",".join(map(str, k)): v for k, v in screened.items()},
                     "loss_start": fit.loss_start, "loss_best": fit.loss_best,
                     "seconds": round(fit.seconds, 1)})
            # Measured through the pipeline's own lookup, as a user's call runs it.
            pipe.manifest.solver_tables = {table.key: table}
            psnr, worst, _ = heldout_error(pipe, table, held_teacher)
            table = replace(table, heldout={**record_h, "psnr_db": round(psnr, 3),
                                            "max_abs": round(worst, 4)})
            tables[table.key] = table
            note(f"NFE {n}: held-out {psnr:.2f} dB (AB2 {baselines['ab2 guidance_edges']:.2f}, "
                 f"Euler {baselines['euler guidance_edges']:.2f}), fit {fit.seconds:.0f} s")
    finally:
        pipe.close()
    if record:
        record_solver_tables(root, list(tables.values()))
    return TuningReport(tables, digest, root)


def record_solver_tables(bundle: str | Path, tables: Sequence[SolverTable]) -> None:
    """Add ``tables`` to the bundle's manifest through `BundleTransaction` (staged, swapped in
    whole; tables for other keys are kept)."""
    from runtimes import bundle as rb

    from .export.bundle_io import BundleTransaction

    manifest = rb.read_manifest(bundle)
    with BundleTransaction(bundle, manifest.model, manifest.model.image_size,
                           manifest.source) as txn:
        for table in tables:
            txn.add_solver_table(table)


def recheck_solver_tables(bundle: str | Path, *, backend: str = "onnxruntime",
                          tolerance_db: float = RECHECK_TOLERANCE_DB,
                          say: Callable[[str], None] | None = None,
                          **backend_options: Any) -> list[str]:
    """Measure every tuned table's held-out PSNR again on this machine through ``backend``;
    report lines, or a ValueError naming each table that lost more than ``tolerance_db``."""
    from runtimes import bundle as rb

    manifest = rb.read_manifest(bundle)
    if not manifest.solver_tables:
        return []
    note = say or (lambda _m: None)
    lines, problems = [], []
    pipe = _open(Path(bundle), backend, verify=False, **backend_options)
    try:
        for key, table in manifest.solver_tables.items():
            note(f"re-measuring tuned solver table {key} on its held-out noises")
            recorded = table.heldout.get("psnr_db")
            if recorded is None or not {"seed", "noises", "teacher"} <= set(table.heldout):
                problems.append(f"solver table {key}: records no held-out error; run `deco "
                                "calibrate BUNDLE --solver` again")
                continue
            psnr, _, _ = heldout_error(pipe, table)
            line = (f"solver table {key}: held-out {psnr:.2f} dB here, {float(recorded):.2f} "
                    "recorded")
            if psnr < float(recorded) - tolerance_db:
                problems.append(f"{line}: more than {tolerance_db} dB worse; the table was "
                                "changed or does not suit this runtime: run `deco calibrate "
                                "BUNDLE --solver` again")
            else:
                lines.append(f"{line}: passed")
    finally:
        pipe.close()
    if problems:
        raise ValueError(f"{bundle} failed the tuned solver tables' check:\n  "
                         + "\n  ".join(problems))
    return lines
