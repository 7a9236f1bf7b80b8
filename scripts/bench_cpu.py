#!/usr/bin/env python
"""CPU latency of the ONNX Runtime backend against the reference-style loop (issue 3, section 6).

Protocol: the same model, steps and noise through

* ``torch-reference``: PyTorch eager fp32 with both CFG halves ([uncond; cond]) every step, as
  the reference DeCo code samples (the baseline, speed-up 1.0),
* ``torch`` fp32 with fast CFG (the unconditional half only inside the guidance interval), which
  separates what the CFG schedule saves from what the runtime saves,
* ``onnxruntime-cpu`` fp32 and fp16 (the exported split graphs through the runtime sampler),
* with ``--compile``, ``torch-compile`` fp32 (Inductor fuses the elementwise work),

at two sizes: the golden tiny model at 64x64 (``golden64``) and a random-weight ``DeCo-S/16``
at 256x256 (``s16-256``; zero-initialised tensors get small noise so the images are not flat).
Target: ONNX Runtime >= 2x faster than the reference loop with images within 40 dB PSNR of its
images. Each row runs in its own process (`deco_export.bench`); times are medians after warm-up,
and only ratios measured in one run are meant to be compared (the machine may be shared).

    python scripts/bench_cpu.py --out runs/bench-cpu --markdown docs/benchmarks.md
    python scripts/bench_cpu.py --cases golden64 --steps 4 --repeats 1   # a smoke run
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

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "deco_tiny_64.ckpt"
TARGET_SPEED_UP = 2.0
TARGET_PSNR_DB = 40.0


def verdict(rows: list[dict[str, Any]], precision: str) -> dict[str, Any]:
    """ONNX Runtime at ``precision`` against the reference row: speed-up, PSNR, target met."""
    ort = [r for r in rows if r["backend"] == "onnxruntime-cpu" and r["precision"] == precision]
    if not ort:
        return {"precision": precision, "measured": False}
    r = ort[0]
    psnr = r.get("psnr_db")
    ok_psnr = psnr is None or psnr >= TARGET_PSNR_DB  # None: identical images
    return {"precision": precision, "measured": True, "speed_up": r["speed_up"],
            "speed_up_per_round": r.get("speed_up_per_round"),
            "speed_up_best_runs": r.get("speed_up_best"),
            "psnr_db": psnr, "max_abs_error": r["max_abs_error"],
            "met": bool(r["speed_up"] >= TARGET_SPEED_UP and ok_psnr)}


def stage_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Where each row's time goes, as short lines for the Markdown section."""
    out = []
    for r in rows:
        st = r["stages_ms_per_image"]
        total = r["ms_per_image"]
        out.append(f"{r['backend']} {r['precision']}: DiT {100 * st['dit'] / total:.0f}%, "
                   f"decoder {100 * st['decoder'] / total:.0f}%, other "
                   f"{100 * st['sampler_overhead'] / total:.0f}%")
    return out


def markdown_section(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    env = results[0]["report"]["environment"]
    cores = env.get("cpu_affinity", env["cpu_count"])
    lines = [
        "",
        f"## {time.strftime('%Y-%m-%d')} — {env['cpu_model']}, {cores} cores — "
        "ONNX Runtime CPU vs the reference loop (issue 3 §6)",
        "",
        f"`python scripts/bench_cpu.py --steps {args.steps} --batch {args.batch} --repeats "
        f"{args.repeats} --rounds {args.rounds} --threads {args.threads} "
        f"--precisions {args.precisions}"
        f"{' --compile' if args.compile else ''}`: {args.steps} Euler "
        f"steps, CFG 3.2 on (0.1, 1], batch {args.batch}; per row {args.warmup} warm-up and "
        f"{args.repeats} timed runs in each of {args.rounds} interleaved round(s), median of "
        f"the pooled runs; speed-up = median of the per-round ratios (their range in "
        f"brackets); threads "
        f"{args.threads}; each row in its own process. Target: ONNX Runtime "
        f">= {TARGET_SPEED_UP:g}x faster than the reference loop, images within "
        f"{TARGET_PSNR_DB:g} dB PSNR of its images.",
        "",
    ]
    for res in results:
        rep = res["report"]
        lines += [f"### {res['case']}: {CASES[res['case']]}", "", markdown_table(rep)]
        for v in res["verdicts"]:
            if v["measured"]:
                psnr = "identical" if v["psnr_db"] is None else f"{v['psnr_db']:.1f} dB"
                rounds = v.get("speed_up_per_round") or []
                spread = (f" (rounds {min(rounds):.2f}–{max(rounds):.2f}x)"
                          if len(rounds) > 1 else "")
                lines.append(f"- onnxruntime {v['precision']}: {v['speed_up']:.2f}x{spread}, "
                             f"best run against best run {v['speed_up_best_runs']:.2f}x, {psnr} "
                             f"-> target {'met' if v['met'] else 'NOT met'}")
        lines.append("- time split: " + "; ".join(stage_summary(rep["rows"])))
        la, lb = rep["environment"].get("load_average_start"), rep["environment"].get(
            "load_average_end")
        lines += [f"- load average {la} at the start, {lb} at the end", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"from {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="interleaved rounds of all rows (steadier ratios on a shared machine)")
    ap.add_argument("--threads", default="1",
                    help="threads of both PyTorch and ONNX Runtime, or 'default' (each "
                         "library's own: on an oversubscribed machine their pools spin)")
    ap.add_argument("--precisions", default="fp32,fp16", help="ONNX Runtime precisions")
    ap.add_argument("--compile", action="store_true",
                    help="add a torch.compile row (what operator fusion buys; compiles again in "
                         "every round)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cpu")
    ap.add_argument("--json", type=Path, default=None, help="default: OUT/bench_cpu.json")
    ap.add_argument("--markdown", type=Path, default=None, help="append a section to this file")
    args = ap.parse_args(argv)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    threads = None if args.threads == "default" else int(args.threads)
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    results = []
    for case in cases:
        checkpoint = make_checkpoint(case, args.out / "models", args.seed, GOLDEN,
                                     made_by="scripts/bench_cpu.py")
        out = args.out / f"{case}-threads-{args.threads}"
        bundle = args.out / f"{case}-bundle"
        settings = BenchSettings(
            backends=(REFERENCE, "torch", *(("torch-compile",) if args.compile else ()),
                      "onnxruntime-cpu"), precisions=None,
            batch_sizes=(args.batch,), steps=(args.steps,), repeats=args.repeats,
            warmup=args.warmup, rounds=args.rounds, threads=threads, seed=args.seed)
        if not (bundle / "manifest.json").is_file():
            from deco_export.export.onnx import export_onnx
            from deco_export.sources import load_model

            model, record = load_model(checkpoint)
            print(f"[{case}] exporting ONNX {', '.join(precisions)} into {bundle}", flush=True)
            started = time.perf_counter()
            export_onnx(model, bundle, precisions=precisions, source=record, parity_steps=4)
            print(f"[{case}] export took {time.perf_counter() - started:.0f} s", flush=True)
        print(f"[{case}] benchmarking ({args.steps} steps, batch {args.batch})", flush=True)
        report = run_benchmark(bundle, out, settings)
        verdicts = [verdict(report["rows"], p) for p in precisions]
        results.append({"case": case, "description": CASES[case], "report": report,
                        "verdicts": verdicts, "bench_json": str(out / "bench.json")})
        print(markdown_table(report), flush=True)
        for v in verdicts:
            print(f"[{case}] {v}", flush=True)

    summary = {"protocol": "issue 3 §6", "target": {"speed_up": TARGET_SPEED_UP,
                                                    "psnr_db": TARGET_PSNR_DB},
               "settings": {k: str(v) for k, v in vars(args).items()},
               "cases": [{k: v for k, v in r.items() if k != "report"} | {
                   "rows": r["report"]["rows"], "environment": r["report"]["environment"]}
                   for r in results]}
    json_path = args.json or args.out / "bench_cpu.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {json_path}")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(markdown_section(results, args))
        print(f"appended a section to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
