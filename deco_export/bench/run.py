"""The driver: plan the rows, run each in its own worker process, write the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from runtimes.fileio import atomic_write_text

from .aggregate import assemble_rows, merge_rounds
from .availability import plan_rows
from .catalogue import PROGRESS_MARK, REFERENCE, BenchError
from .fid import held_out_scorer, score_fid_sets
from .machine import best_peaks, cuda_available, environment, measure_peaks
from .plots import write_plots
from .report import markdown_report
from .settings import DEFAULT_PROMPTS, BenchSettings
from .source import prepare_source
from .text import text_path_share

SCHEMA = "deco-bench/1"


def run_worker(spec: dict[str, Any], work: Path, logs: Path, timeout_s: float,
               tick: Callable[[], None]) -> dict[str, Any]:
    """Run one row in a fresh interpreter; progress lines on its stdout feed ``tick``."""
    key = spec["key"]
    spec = {**spec, "result": str(work / f"{key}.result.json")}
    spec_path = work / f"{key}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = logs / f"{spec.get('log_name', key)}.log"
    env = dict(os.environ)
    # The worker imports this very copy of deco_export, wherever the driver found it.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    timed_out = threading.Event()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deco_export.bench.worker", "--worker", str(spec_path)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env)

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_MARK):
                    tick()
                else:
                    log.write(line)
            rc = proc.wait()
        finally:
            timer.cancel()
    result_path = Path(spec["result"])
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        why = (f"timed out after {timeout_s:g} s (raise --timeout)" if timed_out.is_set()
               else f"the worker exited with code {rc}")
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        result = {"status": "failed",
                  "reason": why + (f"; last log line: {tail[-1][:200]}" if tail else "")}
    result["log"] = str(log_path)
    return result


def check_prompts_apply(source: str | Path, settings: BenchSettings) -> None:
    """Refuse ``--prompt`` for a class-conditional source before any work (a checkpoint
    source is class-conditional: a text-to-image one is refused with its own fix)."""
    if not settings.prompts:
        return
    from runtimes import bundle as rb

    from ..sources import is_bundle

    if is_bundle(str(source)) and rb.read_manifest(Path(source)).model.is_text_to_image:
        return
    raise ValueError(f"--prompt is for text-to-image bundles; {source} is not one (a "
                     "class-conditional model samples its classes)")


def check_text_bundle(bundle: Path, manifest: Any, settings: BenchSettings) -> None:
    """Refuse, before any row runs, what a text-to-image benchmark cannot do: encode prompts
    without the bundle's text encoder, or score FID (a class-conditional held-out metric)."""
    if manifest.get_artifact("onnx", "text_encoder", "fp32") is None:
        raise ValueError(
            f"{bundle} has no text encoder to encode the prompts; export the bundle with "
            f"`deco export onnx CHECKPOINT {bundle} --text-encoder DIR`"
        )
    if settings.fid_data:
        raise ValueError("--fid scores class-conditional models; leave it out for a "
                         "text-to-image bundle")


# What a run writes into --out. A directory holding one of these names is written only when a
# run wrote it: it holds MARKER (made before a run writes anything) or an earlier run's
# bench.json (the README's promise: no verb overwrites what it did not write).
OUTPUTS = ("bench.json", "bench.md", "latency.png", "speed_quality.png", "logs", "bundle")
MARKER = ".deco-bench"


def _written_by_bench(out: Path) -> bool:
    if (out / MARKER).is_file():
        return True
    report = out / "bench.json"
    try:
        if not report.is_file() or report.stat().st_size > 64 << 20:
            return False
        return bool(json.loads(report.read_text()).get("schema") == SCHEMA)
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` whose report, plot or log names belong to someone else: only an
    absent or empty directory, one without those names, or an earlier run's is written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; choose another --out")
    if not out.is_dir():
        return
    taken = [name for name in OUTPUTS if os.path.lexists(out / name)]
    if taken and not _written_by_bench(out):
        raise ValueError(
            f"--out {out} holds {', '.join(taken)}, which deco bench did not write; choose "
            "another --out or move them away"
        )


def run_benchmark(source: str | Path, out: str | Path, settings: BenchSettings | None = None,
                  say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark ``source`` (a bundle, a checkpoint or 'default') into ``out``.

    Writes ``bench.json``, ``bench.md``, ``latency.png``, ``speed_quality.png`` and one log per
    worker under ``logs/``; returns the report dict (also in ``bench.json``).
    """
    settings = replace(settings) if settings is not None else BenchSettings()
    settings.check()
    say = say or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    check_out_dir(out)
    check_prompts_apply(source, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    env = environment(settings.threads)
    src, manifest = prepare_source(source, out, settings, say)
    text_to_image = manifest.model.is_text_to_image
    if text_to_image:
        check_text_bundle(src.bundle, manifest, settings)
    if settings.peak_size:
        say(f"measuring this machine's GEMM peak ({settings.peak_size}^3 matrix products, "
            f"{settings.threads or 'all'} thread(s))")
    env["gemm_peak"] = measure_peaks(settings.threads, settings.peak_size)
    cuda = cuda_available()
    device = ("cuda" if cuda else "cpu") if settings.device == "auto" else settings.device
    if device == "cuda" and not cuda:
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    runs, unavailable = plan_rows(settings, manifest, cuda and device == "cuda", src.bundle)
    defaults = manifest.sampler_defaults
    guidance = float(settings.guidance if settings.guidance is not None else defaults.guidance)
    sharing = None
    if settings.sharing:
        from ..sampling import parse_sharing

        sharing = parse_sharing(settings.sharing, settings.sharing_mode)
    size = list(settings.image_size or manifest.model.image_size or ())
    work = out / ".work"
    logs = out / "logs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs.mkdir(exist_ok=True)
    common = {
        "bundle": str(src.bundle.resolve()) if (src.bundle / "manifest.json").is_file() else None,
        "checkpoint": src.checkpoint, "model": manifest.model.to_dict(),
        "sampler_defaults": defaults.to_dict(), "image_size": size,
        "batch_sizes": list(settings.batch_sizes), "steps": list(settings.steps),
        "repeats": settings.repeats, "warmup": settings.warmup, "threads": settings.threads,
        "seed": settings.seed, "guidance": guidance, "sharing": sharing, "device": device,
        "solver": settings.solver,
        "outputs": str(work),
    }
    if text_to_image:
        common["prompts"] = list(settings.prompts or DEFAULT_PROMPTS)
    per_row = len(settings.batch_sizes) * len(settings.steps) * (
        max(1, settings.warmup) + settings.repeats - (settings.warmup == 0))
    scorer, fid_ticks = None, 0
    fid_steps = max(settings.steps)
    if settings.fid_data:
        say(f"FID/KID: {settings.fid_samples} images per row at {fid_steps} steps against "
            f"held-out {settings.fid_data!r}")
        scorer = held_out_scorer(settings, size)
        fid_batch = max(settings.batch_sizes)
        labels = scorer.labels(settings.fid_samples, manifest.model.num_classes)
        common["fid"] = {"labels": [int(v) for v in labels], "batch": fid_batch,
                         "steps": fid_steps}
        fid_ticks = -(-settings.fid_samples // fid_batch)  # one per generated batch
    rounds: dict[str, list[dict[str, Any]]] = {spec.key: [] for spec in runs}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=(per_row * settings.rounds + fid_ticks) * len(runs), unit="run",
                   disable=not settings.progress, desc="bench")
        with bar:
            # Rounds interleave the rows in time, so a slow drift in the machine's load falls
            # on every row alike instead of on whichever row ran during it.
            for rnd in range(settings.rounds):
                # The FID image set is generated once, in the first round.
                expected = per_row + (fid_ticks if rnd == 0 else 0)
                for spec in runs:
                    done = [0]
                    if rnd and rounds[spec.key][0].get("status") != "ok":
                        bar.update(expected)
                        continue
                    bar.set_description(spec.key if settings.rounds == 1
                                        else f"{spec.key} (round {rnd + 1}/{settings.rounds})")

                    def tick(done: list[int] = done) -> None:
                        done[0] += 1
                        bar.update(1)

                    name = spec.key if settings.rounds == 1 else f"{spec.key}.round{rnd + 1}"
                    row_spec = {**common, "key": spec.key, "log_name": name,
                                "row": asdict(spec),
                                "load": spec.kind.load_spec(settings.threads)}
                    if rnd:
                        row_spec.pop("fid", None)
                    result = run_worker(row_spec, work, logs, settings.timeout_s, tick)
                    bar.update(expected - done[0])  # a row that stopped early
                    if spec.backend == REFERENCE and result.get("status") != "ok":
                        raise BenchError(f"the reference row failed ({result.get('reason')}); "
                                         f"see {result['log']}")
                    rounds[spec.key].append(result)
        results = [(spec, merge_rounds(rounds[spec.key])) for spec in runs]
        # Probed again after the rows and the better of the two kept: on a shared machine one
        # probe can fall on a busy moment, and a peak read low puts rows above 100%.
        env["gemm_peak"] = best_peaks(env["gemm_peak"],
                                      measure_peaks(settings.threads, settings.peak_size))
        rows = assemble_rows(results, work, roofline={
            "model": manifest.model, "image_size": size, "peaks": env["gemm_peak"],
            "device": device})
        fid = None if scorer is None else score_fid_sets(scorer, results, work, settings,
                                                         fid_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for spec, result in results:
        if result.get("status") != "ok":
            unavailable.append({"backend": spec.backend, "precision": spec.precision,
                                "status": result.get("status", "failed"),
                                "reason": result.get("reason", "")})
    for u in unavailable:
        u.setdefault("status", "unavailable")
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": asdict(src) | {"bundle": str(src.bundle)},
        "model": manifest.model.to_dict(),
        "image_size": size,  # what every row ran (a bundle's default or a size of its range)
        "guidance": guidance,
        "solver": settings.solver or defaults.solver,
        "guidance_bounds": defaults.guidance_bounds,
        "guidance_interval": list(defaults.guidance_interval),
        "settings": {**asdict(settings), "device": device},
        "environment": env,
        "backends": [{"backend": s.backend, "precision": s.precision, "cfg_mode": s.cfg_mode,
                      **{k: v for k, v in r.items() if k != "runs"}} for s, r in results],
        "rows": rows,
        "unavailable": unavailable,
    }
    if fid is not None:
        report["fid"] = fid
    if text_to_image:
        report["text"] = {
            "prompts": common["prompts"], "encoder": "the bundle's text_encoder.onnx",
            "text_len": manifest.model.text_len, "text_dim": manifest.model.text_dim,
            "text_path_flop_share": text_path_share(manifest.model, *size)}
    files = {"json": out / "bench.json", "markdown": out / "bench.md"}
    if settings.plots:
        if find_spec("matplotlib") is None:
            report["plots"] = "not drawn: No module named 'matplotlib' (pip install matplotlib)"
        else:
            latency, quality = write_plots(report, out)
            files.update(latency_plot=latency, speed_quality_plot=quality)
    report["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["markdown"], markdown_report(report))
    atomic_write_text(files["json"], json.dumps(report, indent=2, default=str) + "\n")
    return report
