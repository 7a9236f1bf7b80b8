#!/usr/bin/env python
"""Few-step solvers on the embedded models: accuracy against a converged sample and ONNX
Runtime time per image, for every solver at NFE 4 to 25, and 50 for some (docs/sampling.md).

For each model (``default``, class-conditional; ``default-t2i``, text-to-image) it exports an
fp32 ONNX bundle once (cached under ``--work``), draws ``--num`` held-out noises (seed 1, never
used by any calibration) with labels cycling over the classes or prompts cycling over held-out
emoji names, and samples:

* the converged reference: Heun on the edge-aligned grid at ``--reference-steps`` steps
  (2N - 1 NFE), and at half the steps to show it converged (the PSNR between the two bounds
  the half-step run's error; the reference's, second order, is about a quarter of it);
* the release sampler at its own step count (c2i Euler 100, t2i AB2 25);
* every solver of ``--solvers`` at every NFE of ``--nfe`` with ``guidance_edges`` (a step
  boundary on each edge of the guidance interval, history restarted there), the solvers of
  ``--long-solvers`` also at ``--long-nfe``, and those of ``--compare`` (class-conditional) /
  ``--compare-t2i`` also without the edges.

Per setting: NFE (model evaluations per CFG branch, from the plan), mean and minimum per-image
PSNR (data range 2) and the largest absolute pixel error against the reference, and the median
ms per image at batch 1 on ONNX Runtime (``--threads`` intra-op threads) over ``--repeats``
runs, measured in the same process. Writes JSON, a markdown table and a PNG plot.

    OMP_NUM_THREADS=1 python scripts/studies/solver_study.py          # the docs/sampling.md run
    OMP_NUM_THREADS=1 python scripts/studies/solver_study.py --models default-t2i --shift 1 \
        --solvers dpm++2m,unipc --nfe 6,8,10 --long-solvers "" --compare-t2i "" \
        --out docs/eval/solver-study-t2i-shift1.json --plot docs/img/solvers-t2i-shift1.png
                                                   # the t2i few-step settings on a flat grid
    python scripts/studies/solver_study.py --num 8 --nfe 4,8 --reference-steps 50 \\
        --work /tmp/ss                                                # a dry run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import runtimes
from deco_export.parity import sample_accuracy as accuracy
from deco_export.studies import (
    NOISE_SEED,
    SOLVERS,
    bundle_for,
    conditions,
    log,
    nfe_axes,
    save_figure,
)
from runtimes.noise import noise_for_keys
from runtimes.sampler import SamplerConfig, make_plan


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="default,default-t2i")
    p.add_argument("--work", type=Path, default=Path("runs/solver-study"))
    p.add_argument("--num", type=int, default=64, help="held-out noises per model")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--nfe", default="4,6,8,10,16")
    p.add_argument("--long-nfe", default="25,50")
    p.add_argument("--long-solvers", default="euler,unipc")
    p.add_argument("--compare", default="ab2,unipc",
                   help="solvers also run without guidance edges (class-conditional)")
    p.add_argument("--compare-t2i", default="ab2",
                   help="the same for text-to-image (edges change only its first step there)")
    p.add_argument("--reference-steps", type=int, default=64)
    p.add_argument("--shift", type=float, default=None,
                   help="the few-step settings' timestep shift (default: the model's); the "
                        "converged reference and the release sampler keep the model's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="batch-1 timing runs per setting")
    p.add_argument("--out", type=Path, default=Path("docs/eval/solver-study.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/img/solvers.png"))
    p.add_argument("--part", default="0/1",
                   help="I/K: run every K-th setting from the I-th (K processes share a model; "
                        "part 0 makes the reference, the others wait for it)")
    return p.parse_args()








def steps_for(solver: str, nfe: int) -> int:
    """Steps whose NFE is closest to ``nfe`` (exact Heun: 2N - 1 evaluations)."""
    return max(2, (nfe + 1) // 2) if solver == "heun" else nfe


def generate(pipe: Any, cond: dict[str, Any], config: SamplerConfig, noise: np.ndarray,
             rows: slice | None = None) -> np.ndarray:
    c = {k: v for k, v in cond.items() if k != "prompts"}
    if rows is not None:
        c = {k: (v[rows] if k != "negative_prompt_embeds" else v) for k, v in c.items()}
        noise = noise[rows]
    kw = dict(steps=config.num_steps, solver=config.solver, guidance_edges=config.guidance_edges,
              guidance=config.guidance, shift=config.shift)
    return np.asarray(pipe.generate(**c, noise=noise, output_type="np", **kw).images)




def ms_per_image(pipe: Any, cond: dict[str, Any], config: SamplerConfig, noise: np.ndarray,
                 repeats: int) -> float:
    times = []
    generate(pipe, cond, config, noise, slice(0, 1))  # warm-up
    for r in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, cond, config, noise, slice(r + 1, r + 2))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def study(name: str, args: argparse.Namespace, nfes: list[int]) -> dict[str, Any]:
    pipe = runtimes.load(bundle_for(name, args.work), backend="onnxruntime",
                         intra_op_threads=args.threads)
    cfg = pipe.model_config
    defaults = pipe.sampler_defaults
    cond = conditions(pipe, name, args.num)
    keys = [(NOISE_SEED, i) for i in range(args.num)]
    noise = noise_for_keys(keys, (cfg.in_channels, *cfg.image_size))
    cache = args.work / f"reference-{name}-{args.reference_steps}-{args.num}.npz"
    ref_cfg = replace(defaults, solver="heun", num_steps=args.reference_steps,
                      guidance_edges=True)
    part, parts = (int(v) for v in args.part.split("/"))
    while part and not cache.is_file():
        time.sleep(10)
    if cache.is_file():
        stored = np.load(cache)
        reference, check = stored["reference"], stored["check"]
    else:
        log(f"{name}: converged reference, Heun {args.reference_steps} and "
            f"{args.reference_steps // 2} steps on {args.num} noises")
        reference = generate(pipe, cond, ref_cfg, noise).astype(np.float64)
        check = generate(pipe, cond, replace(ref_cfg, num_steps=args.reference_steps // 2),
                         noise).astype(np.float64)
        np.savez(cache.with_suffix(".tmp.npz"), reference=reference, check=check)
        cache.with_suffix(".tmp.npz").rename(cache)
    out: dict[str, Any] = {
        "model": name, "family": cfg.family, "num": args.num, "image_size": cfg.image_size,
        "defaults": defaults.to_dict(),
        "reference": {"solver": "heun", "steps": args.reference_steps, "guidance_edges": True,
                      "nfe": make_plan(ref_cfg).num_evaluations,
                      "converged": accuracy(check, reference)},
        "rows": []}
    log(f"{name}: reference vs half its steps: {out['reference']['converged']}")
    settings: list[tuple[str, SamplerConfig, int | None]] = [("release", defaults, None)]
    compare = split(args.compare_t2i if cfg.family == "t2i" else args.compare)
    for solver in split(args.solvers):
        counts = nfes + ([int(v) for v in split(args.long_nfe)]
                         if solver in split(args.long_solvers) else [])
        for nfe in counts:
            for edges in (True, False) if solver in compare and nfe in nfes else (True,):
                settings.append((solver, replace(defaults, solver=solver,
                                                 num_steps=steps_for(solver, nfe),
                                                 guidance_edges=edges,
                                                 shift=args.shift or defaults.shift), nfe))
    for label, config, target in settings[part::parts]:
        t0 = time.perf_counter()
        images = generate(pipe, cond, config, noise)
        row = {"setting": label, "target_nfe": target, "solver": config.solver,
               "steps": config.num_steps,
               "guidance_edges": config.guidance_edges, "shift": config.shift,
               "nfe": make_plan(config).num_evaluations, **accuracy(images, reference),
               "ms_per_image": ms_per_image(pipe, cond, config, noise, args.repeats)}
        out["rows"].append(row)
        log(f"{name} {label:>10} {config.solver:>10} N={config.num_steps:<3} "
            f"edges={int(config.guidance_edges)} NFE={row['nfe']:<3} "
            f"PSNR {row['psnr_mean']:6.2f} dB max {row['max_abs']:.3f} "
            f"{row['ms_per_image']:.1f} ms/img ({time.perf_counter() - t0:.0f} s)")
    pipe.close()
    return out


def split(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for k, solver in enumerate(SOLVERS):
            for edges, style in ((True, "-"), (False, ":")):
                rows = sorted((r for r in res["rows"] if r["setting"] == solver
                               and r["guidance_edges"] == edges), key=lambda r: r["nfe"])
                if not rows:
                    continue
                ax.plot([r["nfe"] for r in rows], [r["psnr_mean"] for r in rows], style,
                        marker="o", ms=3, color=f"C{k}",
                        label=solver if edges else None)
        rel = next(r for r in res["rows"] if r["setting"] == "release")
        ax.scatter([rel["nfe"]], [rel["psnr_mean"]], marker="*", s=120, color="k",
                   label=f"release ({rel['solver']} {rel['steps']})", zorder=5)
        ax.set_ylim(top=max(r["psnr_mean"] for r in res["rows"]) + 3)
        conv = res["reference"]["converged"]["psnr_mean"]
        nfe_axes(ax, f"PSNR vs converged sample (dB), mean of {res['num']}",
                 f"{res['model']} ({res['family']}); solid: guidance edges, dotted: "
                 f"without\nreference converged to {conv:.1f} dB")
    save_figure(fig, path)






def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        targets = sorted({r["target_nfe"] for r in res["rows"] if r["target_nfe"]})
        rel = next(r for r in res["rows"] if r["setting"] == "release")
        conv = res["reference"]["converged"]
        lines += [f"\n{res['model']} ({res['family']}): mean PSNR (dB) / largest abs error / "
                  f"ms per image (batch 1), against Heun {res['reference']['steps']} steps "
                  f"({res['reference']['nfe']} NFE, edges; {conv['psnr_mean']:.1f} dB from "
                  f"half its steps); release {rel['solver']} {rel['steps']}: "
                  f"{rel['psnr_mean']:.1f} / {rel['max_abs']:.2f} / "
                  f"{rel['ms_per_image']:.0f}. Solver `e`: with guidance edges; (n): the NFE "
                  "where it differs from the column\n",
                  "| solver | " + " | ".join(f"NFE {n}" for n in targets) + " |",
                  "|---|" + "---:|" * len(targets)]
        for solver in SOLVERS:
            for edges in (True, False):
                rows = {r["target_nfe"]: r for r in res["rows"] if r["setting"] == solver
                        and r["guidance_edges"] == edges}
                if not rows:
                    continue
                cells = []
                for n in targets:
                    r = rows.get(n)
                    cells.append("" if r is None else (
                        f"{r['psnr_mean']:.1f} / {r['max_abs']:.2f} / {r['ms_per_image']:.0f}"
                        + ("" if r["nfe"] == n else f" ({r['nfe']})")))
                lines.append(f"| {solver}{' e' if edges else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    nfes = [int(v) for v in args.nfe.split(",") if v]
    from deco_export.machine import cpu_model

    # A model's finished study is kept (work/result-<model>-<settings>-<part>.json, or an
    # earlier --out with the same settings), so models can run in separate processes and a
    # last run writes the report; other settings (solvers, NFE, shift, ...) are a new study.
    study_args = {k: getattr(args, k) for k in ("num", "solvers", "nfe", "long_nfe",
                                                 "long_solvers", "compare", "compare_t2i",
                                                 "reference_steps", "shift")}
    key = hashlib.sha256(json.dumps(study_args, sort_keys=True).encode()).hexdigest()[:8]
    earlier = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
    results = []
    for name in (n for n in args.models.split(",") if n):
        done = args.work / f"result-{name}-{key}-{args.part.replace('/', 'of')}.json"
        found = [r for r in earlier if r["model"] == name and r.get("study_args") == study_args]
        pieces = sorted(args.work.glob(f"result-{name}-{key}-[0-9]*of[0-9]*.json"))
        if done.is_file() or (args.part == "0/1" and pieces):
            merged = [json.loads(p.read_text()) for p in (pieces or [done])]
            results.append({**merged[0], "rows": [r for m in merged for r in m["rows"]]})
        elif found:
            results.append(found[0])
        else:
            results.append({**study(name, args, nfes), "study_args": study_args})
            done.write_text(json.dumps(results[-1], indent=1) + "\n")
    report = {"cpu": cpu_model(), "threads": args.threads, "runtime": "onnxruntime fp32",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    plot(results, args.plot)
    log(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.plot}")


if __name__ == "__main__":
    main()
