"""``deco bench``: one benchmark across runtimes, precisions, batch sizes and step counts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from ..bench import CFG_MODES, KINDS
from .options import SolverChoice, parse_csv, parse_ints, parse_size


@click.command("bench")
@click.argument("source", metavar="[BUNDLE_OR_CHECKPOINT]", default="default")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench"),
              show_default=True, help="folder for bench.json, bench.md, the plots and logs")
@click.option("--backends", default=None,
              help="comma list (default: all): " + ", ".join(KINDS) + "; 'onnxruntime' = all "
                   "its providers")
@click.option("--skip", multiple=True, help="backends to leave out, e.g. torch-compile "
                                            "(comma list or repeated)")
@click.option("--precisions", default=None,
              help="comma list of fp32, bf16, fp16, int8 (default: each backend's own: "
                   "PyTorch fp32 on the CPU, what the bundle holds for the runtimes)")
@click.option("--batch-sizes", default=None, help="comma list [default: 1,4]")
@click.option("--steps", default=None, help="comma list of step counts [default: 50; quick 10]")
@click.option("--repeats", type=int, default=None, help="timed runs per row [default: 5; quick 2]")
@click.option("--warmup", type=int, default=None, help="untimed runs first [default: 1]")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="run the whole row sequence this many times, interleaved, and pool the runs "
                   "(steadier ratios on a shared machine)")
@click.option("--threads", type=int, default=None,
              help="CPU threads for PyTorch and ONNX Runtime (default: each library's own)")
@click.option("--sharing", default=None,
              help="DiT sharing for every row but the reference: a ratio (0.5), 'every:K', "
                   "'0,2,4' or a schedule JSON / key")
@click.option("--sharing-mode", type=click.Choice(["reuse", "fresh_t"]), default="reuse",
              show_default=True)
@click.option("--cfg-mode", type=click.Choice(list(CFG_MODES)), default="fast", show_default=True,
              help="CFG of every row but the reference (which always runs both halves)")
@click.option("--guidance", type=float, default=None, help="default: the bundle's sampler default")
@click.option("--solver", type=SolverChoice(), default=None,
              help="the solver of every row [the bundle's sampler default]; rows report its "
                   "NFE (model evaluations per CFG branch)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="device of the PyTorch rows")
@click.option("--image-size", default=None,
              help="HxW to benchmark at: a checkpoint is exported at it, a bundle runs it "
                   "inside its size range [the model's / the bundle's default]")
@click.option("--checkpoint", default=None,
              help="the bundle's source checkpoint, when the manifest's path is not valid here")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--timeout", type=float, default=1800.0, show_default=True,
              help="seconds one backend may take")
@click.option("--quick", is_flag=True,
              help="batch 1 and 4, 10 steps, 2 repeats, no torch.compile")
@click.option("--fid", "fid_data", default=None, metavar="DATA",
              help="also score each row's images with FID/KID against held-out DATA (emoji, "
                   "fashion-mnist or a class folder; the eval extra)")
@click.option("--fid-samples", type=int, default=500, show_default=True,
              help="images per row for --fid")
@click.option("--peak-size", type=int, default=None,
              help="matrix size of the GEMM peak probe behind the roofline columns, 0 to skip "
                   "[default: 2048; quick 1024]")
@click.option("--prompt", "prompts", multiple=True,
              help="text-to-image bundles: a prompt to encode (repeat for several; image i of a "
                   "batch takes prompt i mod their number) [a fixed list of four]")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def bench_command(source: str, out: Path, backends: str | None, skip: tuple[str, ...],
                  precisions: str | None, batch_sizes: str | None, steps: str | None,
                  repeats: int | None, warmup: int | None, rounds: int, threads: int | None,
                  sharing: str | None, sharing_mode: str, cfg_mode: str, guidance: float | None,
                  device: str, image_size: str | None, checkpoint: str | None, seed: int,
                  timeout: float, quick: bool, fid_data: str | None, fid_samples: int,
                  peak_size: int | None, prompts: tuple[str, ...], no_plots: bool,
                  no_progress: bool, solver: str | None) -> None:
    """Benchmark every backend x precision x batch size x step count on one model and noise.

    BUNDLE_OR_CHECKPOINT is a bundle (its source checkpoint runs the PyTorch rows), a
    checkpoint (its ONNX graphs are exported into OUT/bundle first; that is the build time) or
    'default'. The first row is the reference sampler (PyTorch eager fp32, both CFG halves
    every step); every row shows its speed-up and its image change (max abs error, PSNR)
    against it, its achieved GFLOP/s and the percentage of this machine's GEMM peak (measured
    once per run). Backends this machine cannot run are listed with the reason.

    Writes OUT/bench.json (with the environment), OUT/bench.md and PNG plots, and prints the
    table. With --fid DATA each row also samples --fid-samples images (same noise on every row)
    and scores them with FID/KID against DATA's held-out images.

    A text-to-image bundle encodes --prompt (or a fixed list) with its text encoder once per
    generation, timed as its own stage with its share of the generation.
    """
    from ..bench import BenchSettings, fid_table, markdown_table, run_benchmark

    base = BenchSettings.quick() if quick else BenchSettings()
    skips = [p for s in skip for p in (parse_csv(s) or [])]
    settings = replace(
        base,
        backends=tuple(parse_csv(backends) or ()) if backends is not None else None,
        skip=tuple(dict.fromkeys([*base.skip, *skips])),
        precisions=tuple(parse_csv(precisions) or ()) if precisions is not None else None,
        batch_sizes=parse_ints(batch_sizes, "--batch-sizes") or base.batch_sizes,
        steps=parse_ints(steps, "--steps") or base.steps,
        repeats=base.repeats if repeats is None else repeats,
        warmup=base.warmup if warmup is None else warmup, rounds=rounds,
        threads=threads, sharing=sharing, sharing_mode=sharing_mode, cfg_mode=cfg_mode,
        guidance=guidance, device=device, seed=seed, checkpoint=checkpoint,
        image_size=parse_size(image_size) if image_size else None, timeout_s=timeout,
        plots=not no_plots, progress=not no_progress, fid_data=fid_data,
        fid_samples=fid_samples,
        peak_size=base.peak_size if peak_size is None else peak_size,
        prompts=tuple(prompts), solver=solver,
    )
    report = run_benchmark(source, out, settings, say=lambda m: click.echo(m, err=True))
    click.echo(markdown_table(report), nl=False)
    if report.get("fid"):
        click.echo("\n" + fid_table(report["fid"]), nl=False)
    env = report["environment"]
    load = env.get("load_average_start") or [0.0]
    usable = env.get("cpu_affinity") or env.get("cpu_count") or 1
    if threads is None and load[0] > usable:
        click.echo(f"note: load average {load[0]} on {usable} usable cores; the libraries' "
                   "thread pools spin and slow down badly on a busy machine (compare with "
                   "--threads 1)", err=True)
    drawn = "latency_plot" in report["files"]
    plots = " and plots" if drawn else (f"; plots {report['plots']}"
                                        if isinstance(report.get("plots"), str) else "")
    click.echo(f"wrote {report['files']['json']}, {report['files']['markdown']}{plots}",
               err=True)
