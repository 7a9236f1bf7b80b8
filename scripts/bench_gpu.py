#!/usr/bin/env python
"""GPU latency of DeCo sampling: the reference-style PyTorch loop vs the fast backends.

Protocol (issue 6; the DeCo paper's A800 setting): DeCo-XL/16 at 256x256 with random weights,
100 Euler steps, classifier-free guidance 3.2 on (0.1, 1], batch 1 and a larger batch. Rows:

* ``eager-reference``: what the reference sampler does: fp32 weights under bf16 autocast, one
  [uncond; cond] forward per step, the guidance interval tested on a GPU tensor (a host sync
  per step), Python-side Euler update.
* ``torch-cuda``: `deco_export.backends.cuda_backend.CudaGraphBackend`: bf16 weights,
  torch.compile and one CUDA graph per whole step, driven by the runtime sampler (fast CFG: no
  unconditional half outside the interval).
* ``ort-cuda``: the ONNX Runtime backend on CUDAExecutionProvider (device-resident IO), when
  onnxruntime-gpu is installed; the fp16 graphs are exported into a temporary bundle first.
* ``tensorrt``: the TensorRT backend on a bundle given with ``--tensorrt-bundle`` (engines built
  by ``deco export tensorrt``), when TensorRT is installed.

Times are wall-clock per full sampling run after warm-up (median of ``--repeats``), reported per
step and per image, with the device named. Compile / capture / export time is reported apart.
``--markdown docs/benchmarks.md`` appends the table; ``--json`` writes every row.

    python scripts/bench_gpu.py                       # on an H100: the issue's measurement
    python scripts/bench_gpu.py --device cpu --preset DeCo-tiny/16 --size 64 --steps 4 \\
        --batches 1,2 --only eager-reference          # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import runtimes
from deco_export import DeCo, get_preset
from deco_export.model import random_model
from deco_export.parity import psnr as _psnr
from runtimes.sampler import SamplerConfig, make_plan, sample

ROWS = ("eager-reference", "torch-cuda", "ort-cuda", "tensorrt")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reference_loop(model: DeCo, noise: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor,
                   guidance: float, interval: tuple[float, float], null_class: int,
                   autocast: bool) -> torch.Tensor:
    """The reference EulerSampler's loop (DeCo's c2i code), including its per-step host sync."""
    x = noise
    b = x.shape[0]
    y2 = torch.cat([torch.full_like(labels, null_class), labels])
    lo = torch.tensor(interval[0], device=x.device)
    hi = torch.tensor(interval[1], device=x.device)
    for i in range(grid.shape[0] - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        x2 = torch.cat([x, x])
        t2 = t_cur.repeat(2 * b)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            v = model(x2, t2, y2)
        v = v.float()
        v_u, v_c = v.chunk(2)
        if t_cur > lo and t_cur <= hi:  # a GPU tensor in a Python `if`: the host waits here
            v = v_u + guidance * (v_c - v_u)
        else:
            v = v_c
        x = x + v * (t_next - t_cur)
    return x


def timed(run: Callable[[], Any], device: torch.device, repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def row(name: str, batch: int, steps: int, times: list[float], setup_s: float,
        device: torch.device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    total = statistics.median(times)
    out = {
        "backend": name, "batch": batch, "steps": steps,
        "seconds_per_run": round(total, 4),
        "ms_per_step": round(1000 * total / steps, 3),
        "ms_per_image": round(1000 * total / batch, 2),
        "runs": [round(t, 4) for t in times],
        "setup_seconds": round(setup_s, 1),
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out.update(extra or {})
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    return _psnr(a, b, data_range=2.0)


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   compute_capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["gpu"] = "none (CPU)"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="DeCo-XL/16")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--guidance", type=float, default=3.2)
    ap.add_argument("--interval", default="0.1,1.0")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run, from {ROWS}")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode of the torch-cuda row ('default' compiles faster)")
    ap.add_argument("--no-compile", action="store_true", help="torch-cuda row without compile")
    ap.add_argument("--tensorrt-bundle", default=None, help="bundle with engines for this GPU")
    ap.add_argument("--tensorrt-precision", default="fp16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--markdown", default=None, help="append a table to this file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; run with --device cpu for a smoke run",
              file=sys.stderr)
        return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    lo, hi = (float(v) for v in args.interval.split(","))
    env = environment(device)
    print(f"# {env['gpu']} | torch {env['torch']} | {args.preset} {args.size}x{args.size} | "
          f"{args.steps} Euler steps, CFG {args.guidance} on ({lo}, {hi}]", flush=True)

    model = random_model(get_preset(args.preset), args.seed)
    cfg = model.config
    null = cfg.null_class
    sampler_cfg = SamplerConfig(num_steps=args.steps, guidance=args.guidance,
                                guidance_interval=(lo, hi))
    plan = make_plan(sampler_cfg)
    grid = torch.from_numpy(plan.grid.copy()).to(device)
    rows: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int], np.ndarray] = {}

    def record(r: dict[str, Any]) -> None:
        rows.append(r)
        print(f"{r['backend']:>16} batch {r['batch']:>3}: {r['ms_per_step']:8.3f} ms/step "
              f"{r['ms_per_image']:9.2f} ms/image  (setup {r['setup_seconds']} s)", flush=True)

    def noise_for(b: int) -> tuple[np.ndarray, np.ndarray]:
        noise = runtimes.sample_noise(args.seed, b, cfg.in_channels, args.size, args.size)
        labels = (np.arange(b) * 37) % cfg.num_classes
        return noise, labels.astype(np.int64)

    if "eager-reference" in only:
        ref = model.to(device)
        for b in batches:
            noise, labels = noise_for(b)
            xt = torch.from_numpy(noise).to(device)
            yt = torch.from_numpy(labels).to(device)
            t0 = time.perf_counter()
            reference_loop(ref, xt, yt, grid, args.guidance, (lo, hi), null, True)  # warm-up
            sync(device)
            setup = time.perf_counter() - t0
            times, out = timed(lambda xt=xt, yt=yt: reference_loop(
                ref, xt, yt, grid, args.guidance, (lo, hi), null, True), device, args.repeats)
            outputs[("eager-reference", b)] = out.float().cpu().numpy()
            record(row("eager-reference", b, args.steps, times, setup, device,
                       {"weights": "fp32", "compute": "bf16 autocast"}))
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def run_backend(name: str, make: Callable[[], Any], extra: dict[str, Any]) -> None:
        try:
            t0 = time.perf_counter()
            backend = make()
            made = time.perf_counter() - t0
        except Exception as exc:  # a missing runtime is a row that says why, not a crash
            print(f"{name:>16}: skipped ({type(exc).__name__}: {exc})", flush=True)
            rows.append({"backend": name, "skipped": f"{type(exc).__name__}: {exc}"})
            return
        try:
            for b in batches:
                noise, labels = noise_for(b)
                t0 = time.perf_counter()
                sample(backend, noise, labels, plan, null_class=null)  # compile / capture
                setup = made + time.perf_counter() - t0
                made = 0.0
                times, out = timed(lambda n=noise, la=labels: sample(
                    backend, n, la, plan, null_class=null), device, args.repeats)
                outputs[(name, b)] = out
                r = row(name, b, args.steps, times, setup, device, dict(extra))
                ref_out = outputs.get(("eager-reference", b))
                if ref_out is not None:
                    r["psnr_vs_eager_db"] = round(psnr(ref_out, out), 1)
                record(r)
        except Exception as exc:
            traceback.print_exc()
            rows.append({"backend": name, "failed": f"{type(exc).__name__}: {exc}"})
        finally:
            close = getattr(backend, "close", None)
            if callable(close):
                close()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if "torch-cuda" in only:
        from deco_export.backends.cuda_backend import CudaGraphBackend

        if device.type != "cuda":
            print(f"{'torch-cuda':>16}: skipped (needs --device cuda)", flush=True)
            rows.append({"backend": "torch-cuda", "skipped": "needs --device cuda"})
        else:
            compile_ = not args.no_compile
            run_backend("torch-cuda", lambda: CudaGraphBackend(
                model, device=device, precision="bf16", compile=compile_,
                compile_mode=args.compile_mode),
                {"weights": "bf16", "compile": args.compile_mode if compile_ else "off",
                 "cuda_graphs": "whole step"})

    if "ort-cuda" in only:
        run_backend("ort-cuda", lambda: _ort_backend(model, args.size),
                    {"weights": "fp16 graphs", "providers": "CUDAExecutionProvider"})

    if "tensorrt" in only and args.tensorrt_bundle:
        run_backend("tensorrt", lambda: runtimes.load(
            args.tensorrt_bundle, backend="tensorrt",
            precision=args.tensorrt_precision).backend,
            {"weights": args.tensorrt_precision, "cuda_graphs": "whole step"})

    report = {"environment": env, "settings": vars(args), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(markdown(report))
    return 0


def _ort_backend(model: DeCo, size: int) -> Any:
    """Export the fp16 graphs into a temporary bundle and open them on CUDA."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from deco_export.export.onnx import export_onnx

    bundle = Path(tempfile.mkdtemp(prefix="deco-bench-")) / "bundle"
    export_onnx(model.cpu().float(), bundle, precisions=("fp16",), image_size=(size, size),
                parity_steps=2, source={"path": "random weights"})
    return runtimes.load(bundle, backend="onnxruntime", precision="fp16",
                         providers="cuda").backend


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    lines = [
        "",
        f"## {time.strftime('%Y-%m-%d')}: {env['gpu']} (torch {env['torch']}, CUDA "
        f"{env.get('cuda')})",
        "",
        f"{s['preset']} at {s['size']}x{s['size']}, random weights, {s['steps']} Euler steps, "
        f"CFG {s['guidance']} on ({s['interval']}]; median of {s['repeats']} runs after "
        "warm-up (`scripts/bench_gpu.py`).",
        "",
        "| backend | batch | ms / step | ms / image | setup s | peak GiB | PSNR vs eager | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        if "ms_per_step" not in r:
            lines.append(f"| {r['backend']} | | | | | | | {r.get('skipped') or r.get('failed')} |")
            continue
        notes = ", ".join(f"{k} {v}" for k, v in r.items() if k in (
            "weights", "compute", "compile", "cuda_graphs", "providers"))
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['ms_per_step']} | {r['ms_per_image']} | "
            f"{r['setup_seconds']} | {r.get('peak_memory_gib', '')} | "
            f"{r.get('psnr_vs_eager_db', '')} | {notes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
