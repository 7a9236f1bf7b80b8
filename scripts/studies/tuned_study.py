#!/usr/bin/env python
"""Tuned solver tables on the embedded models: tune (``deco calibrate --solver``), then measure
them on the held-out protocol of scripts/studies/solver_study.py (docs/sampling.md).

For each model it takes solver_study's fp32 ONNX bundle (cached under ``--work``), fits one
table per NFE of ``--nfe`` on the calibration noises and labels or prompts
(`deco_export.solver_tuning`, seeds 10 and 11; the study's seed 1 is used by neither), then
samples the study's ``--num`` held-out noises (seed 1) with ``solver="tuned"`` and, as a check
that the reference is the study's, Euler with guidance edges at ``--check-nfe``. PSNR and the
largest error are against the study's converged reference (Heun 64 steps with edges), and
ms/image at batch 1 on ONNX Runtime in the same process. The untuned solvers' rows come from
``--study`` (docs/eval/solver-study.json) and are plotted with the tuned ones.

    OMP_NUM_THREADS=1 python scripts/tuned_study.py                     # the docs run
    python scripts/tuned_study.py --num 8 --nfe 4 --iterations 2 --work /tmp/ts   # dry run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

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
from runtimes.sampler import make_plan


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="default,default-t2i")
    p.add_argument("--work", type=Path, default=Path("runs/solver-study"))
    p.add_argument("--num", type=int, default=64, help="held-out noises per model")
    p.add_argument("--nfe", default="6,8")
    p.add_argument("--check-nfe", default="8,25", help="Euler (edges) rows rerun as a check")
    p.add_argument("--samples", type=int, default=8, help="calibration samples of the fit")
    p.add_argument("--heldout", type=int, default=8, help="the fit's own held-out samples")
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--reference-steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--study", type=Path, default=Path("docs/eval/solver-study.json"))
    p.add_argument("--out", type=Path, default=Path("docs/eval/tuned-study.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/img/solvers-tuned.png"))
    return p.parse_args()


def images(pipe: Any, cond: dict[str, Any], noise: np.ndarray, **settings: Any) -> np.ndarray:
    c = {k: v for k, v in cond.items() if k != "prompts"}
    return np.asarray(pipe.generate(**c, noise=noise, output_type="np", **settings).images)


def ms_per_image(pipe: Any, cond: dict[str, Any], noise: np.ndarray, repeats: int,
                 **settings: Any) -> float:
    def one(i: int) -> float:
        c = {k: (v[i:i + 1] if k != "negative_prompt_embeds" else v)
             for k, v in cond.items() if k != "prompts"}
        t0 = time.perf_counter()
        pipe.generate(**c, noise=noise[i:i + 1], output_type="np", **settings)
        return time.perf_counter() - t0

    one(0)
    return 1000 * float(np.median([one(r + 1) for r in range(repeats)]))


def study(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from deco_export.solver_tuning import tune_solver_tables

    bundle = bundle_for(name, args.work)
    nfes = [int(v) for v in args.nfe.split(",") if v]
    have = {t.nfe for t in runtimes.bundle.read_manifest(bundle).solver_tables.values()}
    missing = [n for n in nfes if n not in have]
    if missing:
        last = [0.0]

        def progress(what: str, i: int, total: int, loss: float) -> None:
            if i in (0, total) or time.perf_counter() - last[0] > 60:
                last[0] = time.perf_counter()
                log(f"{name} {what}: iteration {i}/{total}, loss {loss:.3e}")

        tune_solver_tables(bundle, missing, samples=args.samples, heldout=args.heldout,
                           iterations=args.iterations, lr=args.lr, progress=progress,
                           say=lambda m: log(f"{name}: {m}"), intra_op_threads=1)
    pipe = runtimes.load(bundle, backend="onnxruntime", intra_op_threads=1)
    cfg = pipe.model_config
    defaults = pipe.sampler_defaults
    cond = conditions(pipe, name, args.num)
    noise = noise_for_keys([(NOISE_SEED, i) for i in range(args.num)],
                           (cfg.in_channels, *cfg.image_size))
    cache = args.work / f"reference-{name}-{args.reference_steps}-{args.num}.npz"
    if cache.is_file():
        reference = np.load(cache)["reference"]
    else:
        log(f"{name}: converged reference, Heun {args.reference_steps} steps with edges")
        reference = images(pipe, cond, noise, solver="heun", steps=args.reference_steps,
                           guidance_edges=True).astype(np.float64)
        np.savez(cache.with_suffix(".tmp.npz"), reference=reference, check=reference)
        cache.with_suffix(".tmp.npz").rename(cache)
    rows = []
    tables = pipe.manifest.solver_tables
    settings: list[tuple[str, int, dict[str, Any]]] = [
        ("tuned", n, {"solver": "tuned", "steps": n}) for n in nfes]
    settings += [("euler", int(n), {"solver": "euler", "steps": int(n), "guidance_edges": True})
                 for n in args.check_nfe.split(",") if n]
    for label, n, kw in settings:
        got = images(pipe, cond, noise, **kw)
        config = pipe.sampler_config(steps=n, solver=kw["solver"],
                                     guidance_edges=kw.get("guidance_edges"))
        row = {"setting": label, "target_nfe": n, "solver": config.solver, "steps": n,
               "guidance_edges": True, "nfe": make_plan(config).num_evaluations,
               **accuracy(got, reference),
               "ms_per_image": ms_per_image(pipe, cond, noise, args.repeats, **kw)}
        if label == "tuned":
            table = next(t for t in tables.values() if t.nfe == n)
            row["fit"] = dict(table.fit)
            row["heldout_record"] = {k: table.heldout[k] for k in ("psnr_db", "baselines")}
        rows.append(row)
        log(f"{name} {label:>6} NFE={row['nfe']:<3} PSNR {row['psnr_mean']:6.2f} dB "
            f"max {row['max_abs']:.3f} {row['ms_per_image']:.1f} ms/img")
    pipe.close()
    return {"model": name, "family": cfg.family, "num": args.num,
            "defaults": replace(defaults).to_dict(), "rows": rows}


def plot(study_results: list[dict[str, Any]], tuned: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tuned), figsize=(6.5 * len(tuned), 4.8), squeeze=False)
    for ax, res in zip(axes[0], tuned, strict=True):
        base = next((r for r in study_results if r["model"] == res["model"]), {"rows": []})
        for k, solver in enumerate(SOLVERS):
            rows = sorted((r for r in base["rows"] if r["setting"] == solver
                           and r["guidance_edges"]), key=lambda r: r["nfe"])
            if rows:
                ax.plot([r["nfe"] for r in rows], [r["psnr_mean"] for r in rows], "-",
                        marker="o", ms=3, color=f"C{k}", label=f"{solver} (edges)")
        rows = sorted((r for r in res["rows"] if r["setting"] == "tuned"),
                      key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rows], [r["psnr_mean"] for r in rows], "-", marker="s",
                ms=5, lw=2.2, color="k", label="tuned table")
        euler25 = next((r for r in base["rows"] if r["setting"] == "euler"
                        and r["guidance_edges"] and r["nfe"] == 25), None)
        if euler25 is not None:
            ax.axhline(euler25["psnr_mean"], color="grey", ls="--", lw=1,
                       label=f"Euler 25 ({euler25['psnr_mean']:.1f} dB)")
        rel = next((r for r in base["rows"] if r["setting"] == "release"), None)
        if rel is not None:
            ax.scatter([rel["nfe"]], [rel["psnr_mean"]], marker="*", s=120, color="k",
                       label=f"release ({rel['solver']} {rel['steps']})", zorder=5)
        nfe_axes(ax, f"PSNR vs converged sample (dB), mean of {res['num']}",
                 f"{res['model']} ({res['family']}): tuned tables against the solvers")
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from runtimes.cpu import cpu_model

    earlier = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
    results = []
    for name in (n for n in args.models.split(",") if n):
        done = args.work / f"tuned-{name}.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        found = [r for r in earlier if r["model"] == name and r["num"] == args.num]
        results.append(found[0] if found else study(name, args))
        done.write_text(json.dumps(results[-1], indent=1) + "\n")
    study_results = json.loads(args.study.read_text())["results"] if args.study.is_file() else []
    report = {"cpu": cpu_model(), "threads": 1, "runtime": "onnxruntime fp32",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(study_results, results, args.plot)
    log(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
