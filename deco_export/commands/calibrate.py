"""``deco calibrate``: StatisticDP DiT-sharing schedules for a bundle or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from runtimes.solver_tables import TUNED

from ..solver_tuning import FIT_ITERATIONS, FIT_SAMPLES, SCHEDULES, TEACHER_STEPS
from .options import SolverChoice, parse_size


def _parse_classes(text: str | None) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(f"cannot read --classes {text!r}; write integers separated by commas") \
            from None


@click.command("calibrate")
@click.argument("source", metavar="BUNDLE_OR_CHECKPOINT", default="default")
@click.option("--steps", type=int, default=None, help="sampler steps N (default: the model's)")
@click.option("--budget", "budgets", multiple=True,
              help="DiT runs per image K; repeat or list (25,10) for several schedules; "
                   "sharing ratio = 1 - K/N")
@click.option("--classes", default=None,
              help="comma-separated calibration labels, repeats allowed (default: every class)")
@click.option("--batch", "batch_size", type=int, default=4, show_default=True,
              help="labels per calibration batch (bounds memory)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
@click.option("--shift", type=float, default=None, help="timestep shift (default: the model's)")
@click.option("--solver", type=SolverChoice(), default=None, is_flag=False, flag_value=TUNED,
              help="the sampler's solver for the sharing schedules; given alone (with --nfe) "
                   "it tunes the bundle's coefficient-table solver instead")
@click.option("--nfe", default=None,
              help="with a bare --solver: the step counts to tune tables for, e.g. 5,6,8,10")
@click.option("--samples", type=int, default=FIT_SAMPLES, show_default=True,
              help="with --nfe: calibration noises (and labels or prompts) the tables are fitted "
                   "on")
@click.option("--heldout", type=int, default=8, show_default=True,
              help="with --nfe: held-out noises the recorded error is measured on")
@click.option("--iterations", type=int, default=FIT_ITERATIONS, show_default=True,
              help="with --nfe: gradient steps per table")
@click.option("--teacher-steps", type=int, default=TEACHER_STEPS, show_default=True,
              help="with --nfe: Heun steps of the teacher (2N - 1 evaluations)")
@click.option("--lr", type=float, default=0.05, show_default=True,
              help="with --nfe: Adam's learning rate")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True,
              help="with --nfe: the learning rate over the iterations")
@click.option("--split-search/--no-split-search", default=True, show_default=True,
              help="with --nfe: choose how many steps lie between each pair of guidance edges "
                   "by short fits (the grid's own split otherwise)")
@click.option("--screen-iterations", type=int, default=12, show_default=True,
              help="with --nfe and --split-search: iterations of each short fit")
@click.option("--mode", type=click.Choice(["reuse", "fresh_t"]), default="reuse",
              show_default=True, help="stored with the schedule: reuse the condition, or cache h "
                                      "and refresh the timestep embedding")
@click.option("--backend", default=None,
              help="onnxruntime, coreml, tensorrt (bundles) or torch (checkpoints)")
@click.option("--precision", default="fp32", show_default=True)
@click.option("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu")
@click.option("--device", default="cpu", show_default=True, help="torch backend device")
@click.option("--image-size", default=None, help="HxW to calibrate at (default: the model's)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("schedules.json"), show_default=True,
              help="schedule JSON (keys already in it are kept)")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="similarity PNG (default: next to --out, named after the key)")
@click.option("--no-record", is_flag=True, help="do not record the schedules in the bundle")
def calibrate_command(source: str, steps: int | None, budgets: tuple[str, ...],
                      classes: str | None, batch_size: int, seed: int, guidance: float | None,
                      shift: float | None, solver: str | None, mode: str, backend: str | None,
                      precision: str, providers: str | None, device: str,
                      image_size: str | None, out: Path, plot: Path | None,
                      no_record: bool, nfe: str | None, samples: int, heldout: int,
                      iterations: int, teacher_steps: int, lr: float, schedule: str,
                      split_search: bool, screen_iterations: int) -> None:
    """Calibrate StatisticDP DiT-sharing schedules (one per --budget) for a bundle or checkpoint.

    Samples the calibration labels with the DiT at every step, averages the token cosine
    similarity between the conditions of every pair of steps, and picks for each budget K the
    K steps that keep every reused condition closest to the one it replaces. Use a schedule
    with `deco sample SOURCE --sharing KEY` (bundles) or `--sharing schedules.json#KEY`.

    `deco calibrate BUNDLE --solver --nfe 5,6,8,10` instead fits the coefficient-table solver
    (time deltas and a lower-triangular table) to the bundle's model for each step count,
    against a many-step teacher, and records the tables in the manifest with their error on
    held-out noises; use one with `deco sample BUNDLE --solver tuned --steps N`.
    """
    if solver == TUNED or nfe is not None:
        if solver != TUNED:
            raise click.UsageError("--nfe tunes solver tables: give it with a bare --solver "
                                   "(deco calibrate BUNDLE --solver --nfe 5,6,8)")
        if nfe is None:
            raise click.UsageError("--solver alone tunes solver tables: give the step counts "
                                   "with --nfe, e.g. --nfe 5,6,8,10")
        _tune_tables(source, nfe, samples=samples, heldout=heldout, iterations=iterations,
                     teacher_steps=teacher_steps, lr=lr, schedule=schedule,
                     split_search=split_search, screen_iterations=screen_iterations,
                     guidance=guidance, shift=shift,
                     backend=backend or "onnxruntime", precision=precision,
                     providers=providers, record=not no_record)
        return
    from tqdm.auto import tqdm

    from ..calibrate import calibrate
    from ..sampling import open_pipeline

    height, width = parse_size(image_size) if image_size else (None, None)
    pipe = open_pipeline(source, backend=backend, precision=precision, providers=providers,
                         device=device)
    if pipe.is_text_to_image:
        raise click.UsageError(f"deco calibrate samples class labels; {source} is a "
                               "text-to-image model, which it does not calibrate")
    labels = _parse_classes(classes)
    num_labels = len(labels) if labels is not None else pipe.model_config.num_classes
    chunks = -(-num_labels // max(1, batch_size))
    bar = None

    def callback(step: int, num_steps: int, t: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=chunks * num_steps, desc="calibrating", unit="step", leave=False)
        bar.update(1)

    try:
        report = calibrate(
            source, budgets, steps=steps, guidance=guidance, shift=shift, solver=solver,
            classes=labels, batch_size=batch_size, seed=seed, mode=mode, height=height,
            width=width, out=out, plot=plot or True, record=not no_record, callback=callback,
            pipe=pipe,
        )
    finally:
        if bar is not None:
            bar.close()

    n = report.similarity.shape[0]
    click.echo(f"calibrated on {num_labels} samples x {n} evaluations "
               f"(model {report.model_hash[:16]})")
    for key, sched in report.schedules.items():
        shown = ",".join(str(s) for s in sched.dit_steps)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        click.echo(f"  {key}: ratio {sched.ratio:.2f}, cost {report.dp_cost[key]:.4f} "
                   f"(uniform {report.uniform_cost[key]:.4f}), DiT at {shown}")
    click.echo(f"wrote {report.json_path}")
    if report.recorded:
        click.echo(f"recorded {len(report.schedules)} schedule(s) in "
                   f"{Path(source) / 'manifest.json'}")
    click.echo(f"wrote {report.plot_path}")


def _tune_tables(source: str, nfe: str, *, samples: int, heldout: int, iterations: int,
                 teacher_steps: int, lr: float, schedule: str, split_search: bool,
                 screen_iterations: int, guidance: float | None, shift: float | None, backend: str,
                 precision: str, providers: str | None, record: bool) -> None:
    """`deco calibrate BUNDLE --solver --nfe ...`: fit, measure, record, summarise."""
    from tqdm.auto import tqdm

    from ..solver_tuning import parse_nfe, tune_solver_tables
    from ..sources import is_bundle

    if not is_bundle(source):
        raise click.UsageError(f"{source} is not a bundle: tuned solver tables are stored in a "
                               "bundle's manifest; export one first (deco export onnx)")
    counts = parse_nfe(nfe)
    bars: dict[str, Any] = {}

    def progress(what: str, i: int, total: int, loss: float) -> None:
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(total=total, desc=f"tuning {what}", unit="it", leave=False)
        if i:
            bar.update(1)
        bar.set_postfix(loss=f"{loss:.2e}")
        if i == total:
            bar.close()

    options = {} if providers is None else {"providers": providers}
    report = tune_solver_tables(
        source, counts, samples=samples, heldout=heldout, iterations=iterations,
        teacher_steps=teacher_steps, lr=lr, schedule=schedule, split_search=split_search,
        screen_iterations=screen_iterations, guidance=guidance, shift=shift, backend=backend,
        precision=precision, record=record, progress=progress,
        say=lambda m: click.echo(m, err=True), **options)
    click.echo(f"tuned on {samples} calibration samples, measured on {heldout} held-out ones "
               f"against Heun {teacher_steps} steps (model {report.model_hash[:16]})")
    click.echo("  NFE  tuned dB  AB2 dB  Euler dB  key")
    for key, table in report.tables.items():
        h = table.heldout
        base = h["baselines"]
        click.echo(f"  {table.nfe:>3}  {h['psnr_db']:8.2f}  {base['ab2 guidance_edges']:6.2f}"
                   f"  {base['euler guidance_edges']:8.2f}  {key}")
    if record:
        click.echo(f"recorded {len(report.tables)} table(s) in "
                   f"{Path(source) / 'manifest.json'}; use `deco sample {source} --solver tuned "
                   f"--steps {counts[0]}`")
