"""``deco calibrate``: StatisticDP DiT-sharing schedules for a bundle or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

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
@click.option("--solver", type=SolverChoice(), default=None)
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
                      no_record: bool) -> None:
    """Calibrate StatisticDP DiT-sharing schedules (one per --budget) for a bundle or checkpoint.

    Samples the calibration labels with the DiT at every step, averages the token cosine
    similarity between the conditions of every pair of steps, and picks for each budget K the
    K steps that keep every reused condition closest to the one it replaces. Use a schedule
    with `deco sample SOURCE --sharing KEY` (bundles) or `--sharing schedules.json#KEY`.
    """
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
