#!/usr/bin/env python
"""CPU runtimes and precisions at realistic sizes, against the reference loop and the machine's
own GEMM peak.

Protocol: an S/16-like and a B/16-like DeCo (DiT-S and DiT-B widths and depths, the DeCo-S/16
pixel decoder; random weights, so the figures are about speed and numerics, not image
quality) at 256x256, the same noise and labels through

* ``torch-reference``: PyTorch eager fp32, both CFG halves every step (speed-up 1.0),
* ``torch`` fp32 and bf16 (CPU autocast) with fast CFG,
* ``onnxruntime-cpu`` fp32 and int8 (dynamically quantized graphs),
* ``openvino-cpu`` fp32 and bf16 (inference precision on the fp32 graphs),

each row in its own process with one thread per library, a warm-up run, then the median of
the timed runs; speed-ups are ratios measured in the same run. ``deco bench`` measures the GEMM
peak once (fp32, bf16, int8 where the CPU has the instructions) and reports per row the
achieved GFLOP/s (analytic FLOPs, `deco_export.flops`) and its percentage of that peak.

Targets (in the benchmark, never in a timed test): on a CPU with AVX-512 BF16 or AMX, bf16
>= 2.5x the reference at >= 40 dB end to end; int8 >= 2.5x at >= 40 dB; the fp32 DiT calls >=
85 % of the measured fp32 peak.

    nohup nice -n 10 python scripts/bench_cpu_roofline.py --markdown docs/benchmarks.md &
    python scripts/bench_cpu_roofline.py --cases dit-s16-256 --steps 2 --repeats 1  # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from deco_export.bench import REFERENCE, BenchSettings, markdown_table, run_benchmark
from deco_export.bench.cases import CASES, make_checkpoint
from deco_export.bench.report import peaks_line

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "deco_tiny_64.ckpt"

DEFAULT_CASES = ("dit-s16-256", "dit-b16-256")
BACKENDS = (REFERENCE, "torch", "onnxruntime-cpu", "openvino-cpu")
TARGET_SPEED_UP = {"bf16": 2.5, "int8": 2.5}
TARGET_PSNR_DB = 40.0
TARGET_FP32_DIT_PERCENT = 85.0


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row against its precision's target."""
    out = []
    for r in rows:
        if r["backend"] == REFERENCE:
            continue
        name = f"{r['backend']} {r['precision']}"
        psnr = r.get("psnr_db")
        db = "identical" if psnr is None else f"{psnr:.1f} dB"
        speed = r.get("speed_up") or 0.0
        if r["precision"] in TARGET_SPEED_UP:
            want = TARGET_SPEED_UP[r["precision"]]
            met = speed >= want and (psnr is None or psnr >= TARGET_PSNR_DB)
            out.append(f"{name}: {speed:.2f}x at {db} (target >= {want:g}x at >= "
                       f"{TARGET_PSNR_DB:g} dB: {'met' if met else 'NOT met'})")
        elif r["precision"] == "fp32" and r.get("dit_percent_of_peak") is not None:
            pct = r["dit_percent_of_peak"]
            met = pct >= TARGET_FP32_DIT_PERCENT
            out.append(f"{name}: {speed:.2f}x at {db}; DiT calls at {pct:.0f}% of the fp32 "
                       f"peak (target >= {TARGET_FP32_DIT_PERCENT:g}%: "
                       f"{'met' if met else 'NOT met'})")
        else:
            out.append(f"{name}: {speed:.2f}x at {db}")
    return out


def markdown_section(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    env = results[0]["report"]["environment"]
    cores = env.get("cpu_affinity", env["cpu_count"])
    libs = env["libraries"]
    command = " ".join(sys.argv[1:]) if args.argv is None else " ".join(args.argv)
    lines = [
        "",
        f"## {time.strftime('%Y-%m-%d')} — {env['cpu_model']}, {cores} cores — "
        "OpenVINO, bf16 and int8 against the reference loop and the GEMM peak"
        + (f" (DiT sharing {args.sharing})" if args.sharing else ""),
        "",
        f"`nice -n 10 python scripts/bench_cpu_roofline.py {command}`: {args.steps} Euler steps, "
        f"CFG 3.2 on (0.1, 1], batch {args.batch}, 256x256; per row {args.warmup} warm-up and "
        f"{args.repeats} timed runs, the median; one thread per library "
        f"(torch {libs.get('torch')}, onnxruntime {libs.get('onnxruntime')}, openvino "
        f"{libs.get('openvino')}); each row in its own process; speed-ups are ratios within "
        "this run. Random weights (the models' shapes, not trained models): PSNR is against "
        "the reference loop's images from the same noise. Read absolute times with the load "
        "average below: on a busy machine they are slow and noisy, and the GEMM peak is "
        "measured under the same load as the rows.",
        "",
        f"- {peaks_line(env)}",
        "",
    ]
    for res in results:
        rep = res["report"]
        la, lb = rep["environment"].get("load_average_start"), rep["environment"].get(
            "load_average_end")
        lines += [f"### {res['case']}: {CASES[res['case']]}", "", markdown_table(rep)]
        lines += [f"- {v}" for v in res["verdicts"]]
        lines += [f"- load average {la} at the start, {lb} at the end", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"from {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--sharing", default=None, help="DiT sharing for every row but the reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cpu-roofline")
    ap.add_argument("--markdown", type=Path, default=None, help="append a section to this file")
    args = ap.parse_args(argv)
    args.argv = argv

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    results = []
    for case in cases:
        checkpoint = make_checkpoint(case, args.out / "models", args.seed, GOLDEN,
                                     made_by="scripts/bench_cpu.py")
        bundle = args.out / f"{case}-bundle"
        if not (bundle / "manifest.json").is_file():
            from deco_export.export.onnx import export_onnx
            from deco_export.sources import load_model

            model, record = load_model(checkpoint)
            print(f"[{case}] exporting ONNX fp32, int8 into {bundle}", flush=True)
            started = time.perf_counter()
            export_onnx(model, bundle, precisions=("fp32", "int8"), source=record,
                        parity_steps=4)
            print(f"[{case}] export took {time.perf_counter() - started:.0f} s", flush=True)
        settings = BenchSettings(
            backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
            batch_sizes=(args.batch,), steps=(args.steps,), repeats=args.repeats,
            warmup=args.warmup, threads=args.threads, seed=args.seed, sharing=args.sharing,
            peak_size=args.peak_size, plots=False, progress=False, checkpoint=str(checkpoint))
        print(f"[{case}] benchmarking ({args.steps} steps, batch {args.batch})", flush=True)
        where = args.out / (case if not args.sharing else f"{case}-sharing-{args.sharing}")
        report = run_benchmark(bundle, where, settings)
        results.append({"case": case, "description": CASES[case], "report": report,
                        "verdicts": verdicts(report["rows"])})
        print(markdown_table(report), flush=True)
        for line in results[-1]["verdicts"]:
            print(f"[{case}] {line}", flush=True)
    summary = {"settings": {k: str(v) for k, v in vars(args).items()},
               "cases": [{"case": r["case"], "verdicts": r["verdicts"],
                          "rows": r["report"]["rows"],
                          "unavailable": r["report"]["unavailable"],
                          "environment": r["report"]["environment"]} for r in results]}
    json_path = args.out / ("bench_cpu_roofline.json" if not args.sharing
                            else f"bench_cpu_roofline-sharing-{args.sharing}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {json_path}")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(markdown_section(results, args))
        print(f"appended a section to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
