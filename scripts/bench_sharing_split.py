#!/usr/bin/env python
"""DiT sharing with and without the split decoder: per-step time on the CPU runtimes.

Protocol: the S/16-like DeCo of ``bench_cpu.py`` (DiT-S widths on the DeCo-S/16 decoder,
random weights) exported to ONNX fp32 at 256x256 with the split decoder graphs, then per row
(ONNX Runtime fp32, OpenVINO bf16; one thread each) three sampler settings from the same noise,
interleaved within each repeat so machine load hits them alike:

* ``no sharing``: the DiT and the fused decoder at every step;
* ``sharing, fused``: DiT sharing 0.5 (the DiT on every second step), the fused decoder on
  every step, recomputing the modulation on reused steps (``decoder_split=False``: what a
  bundle without the split graphs does);
* ``sharing, split``: the same schedule, the decoder's modulation cached at each DiT step and
  only the pixel graph run on the reused steps.

One warm-up generation of each, then the median of ``--repeats``; per-step ratios to "no
sharing" are within this run. The analytic FLOP ratios (`deco_export.flops`) come from the
same sampling plans. A second table times the decoder's graphs alone (the fused graph against
the condition and pixel graphs in sequence) at the batches the sampler calls them with.

    nohup nice -n 10 python scripts/bench_sharing_split.py --markdown docs/benchmarks.md &
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

import runtimes
from deco_export.bench.cases import make_checkpoint
from deco_export.flops import sampling_flops
from deco_export.machine import cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "deco_tiny_64.ckpt"

CASE = "dit-s16-256"
ROWS = (("onnxruntime", "fp32"), ("openvino", "bf16"))
MODES = {"no sharing": (None, True), "sharing, fused": (0.5, False),
         "sharing, split": (0.5, True)}
FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def open_row(bundle: Path, backend: str, precision: str, threads: int) -> Any:
    if backend == "onnxruntime":
        return runtimes.load(bundle, backend=backend, precision=precision,
                             intra_op_threads=threads, inter_op_threads=1,
                             allow_spinning=False)
    return runtimes.load(bundle, backend=backend, precision=precision, threads=threads,
                         cache_dir=False)


def time_row(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds per generation of each mode, the images, and each mode's cost."""
    noise = runtimes.sample_noise(args.seed, args.batch, 3, 256, 256)
    labels = list(range(1, args.batch + 1))

    def run(mode: str) -> tuple[float, Any]:
        sharing, split = MODES[mode]
        start = time.perf_counter()
        out = pipe.generate(class_labels=labels, steps=args.steps, guidance=3.2,
                            guidance_interval=(0.1, 1.0), noise=noise, output_type="np",
                            sharing=sharing, decoder_split=split)
        return time.perf_counter() - start, out

    outs = {mode: run(mode)[1] for mode in MODES}  # warm-up
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            seconds[mode].append(run(mode)[0])
    return {"seconds": {m: statistics.median(s) for m, s in seconds.items()},
            "runs": seconds, "outputs": outs}


def time_graphs(pipe: Any, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Median ms of the fused decoder and of the condition + pixel graphs, per batch."""
    be = pipe.backend
    rng = np.random.default_rng(args.seed)
    tokens, width = 256, int(pipe.model_config.hidden_size)
    out: dict[int, dict[str, float]] = {}
    for batch in (1, 2):
        x = rng.standard_normal((batch, 3, 256, 256), dtype=np.float32)
        cond = rng.standard_normal((batch, tokens, width), dtype=np.float32)
        mod = be.decoder_cond(cond)
        calls = {"decoder": lambda x=x, c=cond: be.decoder(x, c),
                 "decoder_cond": lambda c=cond: be.decoder_cond(c),
                 "decoder_pixel": lambda x=x, m=mod: be.decoder_pixel(x, m)}
        ms: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # warm-up
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                ms[name].append(1e3 * (time.perf_counter() - start))
        out[batch] = {name: statistics.median(v) for name, v in ms.items()}
    return out


def flop_ratios(pipe: Any, args: argparse.Namespace) -> dict[str, float]:
    """Analytic GFLOP per generation of each mode (the same plans the sampler runs)."""
    config = pipe.sampler_config(steps=args.steps, guidance=3.2, guidance_interval=(0.1, 1.0))
    out = {}
    for mode, (sharing, split) in MODES.items():
        cost = pipe.plan(config, sharing).cost(args.batch, split)
        out[mode] = sampling_flops(pipe.model_config, cost, 256, 256) / 1e9
    return out


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, load: tuple[str, str],
             flops: dict[str, float]) -> str:
    flags = sorted(cpu_flags() & set(FLAGS))
    lines = [
        "",
        f"## {time.strftime('%Y-%m-%d')} — {cpu_model()} ({', '.join(flags)}), "
        f"{os.cpu_count()} cores — DiT sharing 0.5 with the split decoder",
        "",
        f"`nice -n 10 python scripts/bench_sharing_split.py --steps {args.steps} --repeats "
        f"{args.repeats}`: the S/16-like DeCo ({CASE}: DiT-S 384 wide, 12 blocks, the DeCo-S/16 "
        f"decoder 32 wide, 3 blocks; random weights) at 256x256, batch {args.batch}, "
        f"{args.steps} Euler steps, CFG 3.2 on (0.1, 1]; one thread per runtime; per row one "
        f"warm-up generation of each setting, then the median of {args.repeats}, the settings "
        "interleaved; ratios are per step, to the same row without sharing, within this run.",
        "",
        f"Load average {load[0]} at the start and {load[1]} at the end (two trainings ran on "
        "the machine's 2 cores throughout, so absolute times are slower than on an idle "
        "machine; the ratios are what to read).",
        "",
        "| backend | precision | no sharing ms/step | sharing 0.5, fused decoder | "
        "sharing 0.5, split decoder | split vs fused (same images to) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["seconds"]
        per = {m: 1e3 * v / args.steps for m, v in s.items()}
        base = per["no sharing"]
        diff = float(np.max(np.abs(np.asarray(r["outputs"]["sharing, split"].images)
                                   - np.asarray(r["outputs"]["sharing, fused"].images))))
        lines.append(
            f"| {r['backend']} | {r['precision']} | {base:.0f} | "
            f"{per['sharing, fused']:.0f} ({base / per['sharing, fused']:.2f}x) | "
            f"{per['sharing, split']:.0f} ({base / per['sharing, split']:.2f}x) | "
            f"{per['sharing, fused'] / per['sharing, split']:.2f}x ({diff:.1e}) |")
    f0 = flops["no sharing"]
    lines += [
        "",
        f"Analytic FLOPs per generation (`deco_export.flops`): {f0:.1f} GFLOP without sharing, "
        f"{flops['sharing, fused']:.1f} with sharing and the fused decoder "
        f"({f0 / flops['sharing, fused']:.2f}x), {flops['sharing, split']:.1f} with the split "
        f"decoder ({f0 / flops['sharing, split']:.2f}x).",
        "",
        "The decoder's graphs alone (ms, median of the same repeats):",
        "",
        "| backend | precision | batch | fused `decoder` | `decoder_cond` | `decoder_pixel` | "
        "cond + pixel |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for batch, g in r["graphs"].items():
            lines.append(
                f"| {r['backend']} | {r['precision']} | {batch} | {g['decoder']:.0f} | "
                f"{g['decoder_cond']:.0f} | {g['decoder_pixel']:.0f} | "
                f"{g['decoder_cond'] + g['decoder_pixel']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=",".join(f"{b}:{p}" for b, p in ROWS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-sharing-split")
    ap.add_argument("--markdown", type=Path, default=None, help="append a section to this file")
    args = ap.parse_args(argv)

    checkpoint = make_checkpoint(CASE, args.out / "models", args.seed, GOLDEN,
                                 made_by="scripts/bench_cpu.py")
    bundle = args.out / f"{CASE}-bundle"
    if not (bundle / "manifest.json").is_file():
        from deco_export.export.onnx import export_onnx
        from deco_export.sources import load_model

        model, record = load_model(checkpoint)
        print(f"exporting ONNX fp32 into {bundle}", flush=True)
        export_onnx(model, bundle, precisions=("fp32",), source=record, parity_steps=4,
                    progress=print)
    load_start = load_average()
    results = []
    flops: dict[str, float] = {}
    for row in args.rows.split(","):
        backend, precision = row.split(":")
        print(f"timing {backend} {precision}", flush=True)
        with open_row(bundle, backend, precision, args.threads) as pipe:
            if not pipe.backend.supports_decoder_split:
                raise SystemExit(f"{bundle} has no split decoder graphs; export it again")
            res = time_row(pipe, args)
            res.update(backend=backend, precision=precision, graphs=time_graphs(pipe, args))
            flops = flop_ratios(pipe, args)
        results.append(res)
        print({m: round(v, 2) for m, v in res["seconds"].items()}, res["graphs"], flush=True)
    section = markdown(results, args, (load_start, load_average()), flops)
    print(section)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
