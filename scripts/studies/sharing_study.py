#!/usr/bin/env python
"""DiT sharing on the default model: speed and quality per sharing ratio and schedule; produced
the tables and figures of docs/sharing.md.

Every setting samples the *same* noise and labels, so differences come from the schedule alone:

* ``off``: the DiT at every step (sharing ratio 0).
* ``uniform-r``: the DiT every 1/(1-r) steps (DeepCache-style), r in 0.5 / 0.75 / 0.8.
* ``dp-r``: StatisticDP with the same budget K = (1-r) N, calibrated once on a separate noise
  seed (``deco_export.calibrate.calibrate``; the similarity PNG is written next to the grids).
* ``*-fresh``: the same schedule in "fresh_t" mode (cache h, rebuild SiLU(e_t + h) each step).

Per setting it reports DiT calls per image, the per-image latency on each CPU backend (PyTorch
eager on the checkpoint and ONNX Runtime on an fp32 bundle exported from it; batch 1, settings
interleaved round by round and the median taken, so every ratio in a column comes from the same
conditions), FID and KID of ``--num`` samples against the held-out emoji images with the
offline FID Inception (``training.metrics``), the FID and mean absolute pixel difference to the
``off`` samples (paired, same noise, far more sensitive than FID at this N), and a sample grid.

Everything expensive is cached under ``--work`` (samples, features, schedules, the bundle), so a
re-run only redoes what changed. The Inception dominates the cost (~3-5 images/s on 2 cores).

    python scripts/studies/sharing_study.py                          # the docs/sharing.md table
    python scripts/studies/sharing_study.py --model runs/x/model --num 60 --steps 20 \\
        --work /tmp/s --img-dir /tmp/s/img                            # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from deco_export.calibrate import calibrate
from runtimes import SharingSchedule, uniform_schedule
from runtimes.image import make_grid, save_png
from runtimes.noise import noise_for_keys

# Spinning OpenMP waits slow every torch call several-fold on a shared machine (as `deco` does,
# set before torch is imported; torch and training are imported inside main()).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RATIOS = (0.5, 0.75, 0.8)
DATA = "emoji"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    p.add_argument("--work", type=Path, default=Path("runs/sharing-study"))
    p.add_argument("--img-dir", type=Path, default=Path("docs/img/sharing"))
    p.add_argument("--steps", type=int, default=50,
                   help="Euler steps (0: the model's default, 100; 50 keeps the study in budget)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale [the model's]")
    p.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    p.add_argument("--fresh", default="dp-0.8",
                   help="settings that also get a fresh_t row, e.g. dp-0.8,uniform-0.8; '' none")
    p.add_argument("--num", type=int, default=250, help="samples per setting for FID/KID")
    p.add_argument("--calib-per-class", type=int, default=2, help="calibration samples per class")
    p.add_argument("--seed", type=int, default=1, help="noise seed of the evaluation samples")
    p.add_argument("--batch", type=int, default=100, help="generation batch")
    p.add_argument("--threads", type=int, default=2, help="threads for generation and Inception")
    p.add_argument("--latency-threads", type=int, default=1, help="threads while timing")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per backend")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="results [WORK/results.json]")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------
# model, bundle, schedules
# ------------------------------------------------------------------------------------------------


def ensure_bundle(model: Any, source: dict[str, Any], root: Path) -> Path:
    """An fp32 ONNX bundle of ``model``; reused when its manifest names the same weights."""
    from deco_export.export.onnx import export_onnx

    if (root / "manifest.json").is_file():
        manifest = runtimes.bundle.read_manifest(root)
        if manifest.source.get("sha256") == source.get("sha256"):
            return root
        raise SystemExit(f"{root} holds a bundle of other weights; delete it or pick --work")
    print(f"exporting {root}", flush=True)
    export_onnx(model, root, precisions=("fp32",), source=source, parity_steps=10)
    return root


def settings_for(n: int, ratios: list[float], fresh: list[str],
                 dp: dict[int, SharingSchedule]) -> dict[str, SharingSchedule | None]:
    """Name -> schedule, in table order (None: no sharing)."""
    out: dict[str, SharingSchedule | None] = {"off": None}
    for r in ratios:
        uni = uniform_schedule(n, ratio=r)
        out[f"uniform-{r:g}"] = uni
        out[f"dp-{r:g}"] = dp[uni.budget]
    for name in fresh:
        if out.get(name) is None:
            raise SystemExit(f"--fresh {name}: not a sharing setting of this run ({list(out)})")
        out[f"{name}-fresh"] = out[name].with_mode("fresh_t")  # type: ignore[union-attr]
    return out


# ------------------------------------------------------------------------------------------------
# latency
# ------------------------------------------------------------------------------------------------


def time_backend(pipe: Any, settings: dict[str, SharingSchedule | None], noise: np.ndarray,
                 label: int, steps: int, guidance: float, repeats: int) -> dict[str, Any]:
    """Median seconds per image (batch 1) of each setting, rounds interleaved across settings.

    Also times one DiT and one decoder call at the CFG batch (2), so the speed-ups can be read
    against the cost split of this model rather than DeCo-XL's.
    """
    def run(schedule: SharingSchedule | None) -> float:
        t0 = time.perf_counter()
        pipe.generate([label], steps=steps, guidance=guidance, noise=noise, sharing=schedule,
                      output_type="np")
        return time.perf_counter() - t0

    for schedule in settings.values():  # warm-up: sessions, allocator, refresh graph
        run(schedule)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, schedule in settings.items():
            times[name].append(run(schedule))

    be = pipe.backend
    x = be.from_numpy(np.concatenate([noise, noise]))
    t = be.from_numpy(np.full(2, 0.5, np.float32))
    y = be.from_numpy(np.array([pipe.model_config.num_classes, label], np.int64))
    cond = be.dit(x, t, y)
    split = {}
    for graph, fn in (("dit", lambda: be.dit(x, t, y)), ("decoder", lambda: be.decoder(x, cond))):
        samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            out = fn()
            be.to_numpy(out)
            samples.append(time.perf_counter() - t0)
        split[graph] = statistics.median(samples[3:])
    return {"seconds": {k: statistics.median(v) for k, v in times.items()},
            "spread": {k: [min(v), max(v)] for k, v in times.items()}, "call_seconds": split}


# ------------------------------------------------------------------------------------------------
# quality
# ------------------------------------------------------------------------------------------------


def generate_set(pipe: Any, labels: np.ndarray, noise: np.ndarray, schedule: Any, steps: int,
                 guidance: float, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(labels), batch):
        res = pipe.generate(list(labels[i : i + batch]), steps=steps, guidance=guidance,
                            noise=noise[i : i + batch], sharing=schedule, output_type="uint8")
        out.append(res.images)
    return np.concatenate(out)


def paired_kid_delta(feats: np.ndarray, feats_off: np.ndarray, feats_real: np.ndarray, *,
                     boots: int = 500, seed: int = 0) -> tuple[float, float, float]:
    """KID(setting) - KID(off) against the same real set, with a paired bootstrap 90% interval.

    Both sets come from the same noise and labels, so image i of one is the counterpart of image
    i of the other; resampling the *indices* (the same ones for both) keeps that pairing, and the
    interval reflects how much of the difference the particular noise draws could explain. The
    real-real kernel term is common to both KIDs and cancels. Returns (delta, low, high).
    """
    d = feats.shape[1]

    def kernels(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x @ x.T / d + 1) ** 3, ((x @ feats_real.T / d + 1) ** 3).mean(axis=1)

    def terms(k_xx: np.ndarray, k_xr: np.ndarray, idx: np.ndarray) -> float:
        sub = k_xx[np.ix_(idx, idx)]
        n = len(idx)
        return (sub.sum() - np.trace(sub)) / (n * (n - 1)) - 2 * k_xr[idx].mean()

    a, b = kernels(feats), kernels(feats_off)
    full = np.arange(len(feats))
    delta = terms(*a, full) - terms(*b, full)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(boots):
        idx = rng.integers(0, len(feats), len(feats))
        draws.append(terms(*a, idx) - terms(*b, idx))
    low, high = np.percentile(draws, [5, 95])
    return float(delta), float(low), float(high)


def grid_image(images: np.ndarray, cols: int, scale: int = 2) -> np.ndarray:
    grid = make_grid(images, cols=cols, padding=2, pad_value=255)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def comparison_image(rows: dict[str, np.ndarray], scale: int = 2) -> Any:
    """One row of samples per setting, labelled on the left (same noise in every column)."""
    from PIL import Image, ImageDraw

    strips = {k: grid_image(v, cols=len(v), scale=scale) for k, v in rows.items()}
    h, w = next(iter(strips.values())).shape[:2]
    margin = 130
    canvas = Image.new("RGB", (margin + w, len(strips) * (h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, strip) in enumerate(strips.items()):
        y = i * (h + 4)
        canvas.paste(Image.fromarray(strip), (margin, y))
        draw.text((6, y + h // 2 - 6), name, fill="black")
    return canvas


def main() -> None:
    import torch

    from deco_export.backends.torch_backend import TorchBackend
    from deco_export.sources import load_model
    from runtimes.cache import cache_dir as default_cache_dir
    from training import metrics

    args = parse_args()
    work, img_dir = args.work, args.img_dir
    work.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    model, source = load_model(args.model)
    model = model.float().eval()
    cfg = model.config
    defaults = runtimes.release_sampler(cfg.family).to_dict()
    steps = args.steps or int(defaults["steps"])
    guidance = defaults["guidance"] if args.guidance is None else args.guidance
    bundle = ensure_bundle(model, source, work / "bundle")
    ort = runtimes.load(bundle, backend="onnxruntime", intra_op_threads=args.threads)
    c, (h, w) = cfg.in_channels, cfg.image_size
    print(f"model {source['sha256'][:16]} ({args.model}), {steps} Euler steps, CFG {guidance} "
          f"on {defaults['guidance_interval']}", flush=True)

    # StatisticDP schedules: one calibration, on noise seed 0 (the evaluation uses --seed).
    ratios = [float(r) for r in args.ratios.split(",") if r]
    fresh = [name.strip() for name in args.fresh.split(",") if name.strip()]
    budgets = sorted({uniform_schedule(steps, ratio=r).budget for r in ratios})
    t0 = time.perf_counter()
    calib_labels = [k for k in range(cfg.num_classes) for _ in range(args.calib_per_class)]
    report = calibrate(bundle, budgets, steps=steps, guidance=guidance, classes=calib_labels,
                       batch_size=len(calib_labels), seed=0, out=work / "schedules.json",
                       plot=img_dir / "similarity.png", pipe=ort)
    calib_s = time.perf_counter() - t0
    dp = {s.budget: s for s in report.schedules.values()}
    settings = settings_for(steps, ratios, fresh, dp)
    results: dict[str, Any] = {
        "model": {"source": args.model, "sha256": source["sha256"], "config": cfg.to_dict()},
        "sampler": {"solver": "euler", "steps": steps, "guidance": guidance,
                    "guidance_interval": defaults["guidance_interval"], "shift": defaults["shift"]},
        "calibration": {"samples": len(calib_labels), "seconds": calib_s,
                        "dp_cost": {s.budget: report.dp_cost[key]
                                    for key, s in report.schedules.items()},
                        "uniform_cost": {s.budget: report.uniform_cost[key]
                                         for key, s in report.schedules.items()}},
        "settings": {name: {"dit_steps": None if s is None else list(s.dit_steps),
                            "mode": "reuse" if s is None else s.mode,
                            "dit_calls": steps if s is None else s.budget}
                     for name, s in settings.items()},
        "threads": {"generation": args.threads, "latency": args.latency_threads},
    }
    for name, s in settings.items():
        print(f"  {name:18s} K={results['settings'][name]['dit_calls']:3d} "
              f"{'' if s is None else list(s.dit_steps)[:12]}", flush=True)

    # Latency: batch 1, each backend, settings interleaved.
    one = noise_for_keys([(args.seed, 10_000)], (c, h, w))
    if not args.skip_latency:
        torch.set_num_threads(args.latency_threads)
        backends = {
            "torch": runtimes.DeCoPipeline(TorchBackend(model), cfg.to_dict(), defaults),
            "onnxruntime": runtimes.load(bundle, backend="onnxruntime",
                                         intra_op_threads=args.latency_threads),
        }
        results["latency"] = {}
        for name, pipe in backends.items():
            print(f"timing {name} ({args.repeats} rounds)", flush=True)
            results["latency"][name] = time_backend(pipe, settings, one, 1, steps, guidance,
                                                    args.repeats)
            print("  " + "  ".join(f"{k} {v * 1e3:.0f}ms" for k, v in
                                    results["latency"][name]["seconds"].items()), flush=True)
        torch.set_num_threads(args.threads)

    # Quality: the same noise and held-out class mix for every setting.
    if not args.skip_quality:
        net = metrics.load_inception()
        feats_real, labels_real = metrics.real_features(
            DATA, (h, w), None, net, cache_dir=default_cache_dir(), progress=True)
        labels = metrics.proportional_labels(labels_real, args.num, cfg.num_classes)
        noise = noise_for_keys([(args.seed, i) for i in range(args.num)], (c, h, w))
        grid_labels = np.array([k for _ in range(3) for k in range(cfg.num_classes)])
        grid_noise = noise_for_keys([(args.seed + 1, i) for i in
                                              range(len(grid_labels))], (c, h, w))
        tag = f"{source['sha256'][:12]}-n{steps}-g{guidance:g}-s{args.seed}-{args.num}"
        samples: dict[str, np.ndarray] = {}
        feats: dict[str, np.ndarray] = {}
        grids: dict[str, np.ndarray] = {}
        results["quality"] = {}
        for name, schedule in settings.items():
            cache = work / "samples" / f"{name}-{tag}.npz"
            t0 = time.perf_counter()
            if cache.is_file():
                with np.load(cache) as d:
                    samples[name], feats[name], grids[name] = d["images"], d["feats"], d["grid"]
            else:
                samples[name] = generate_set(ort, labels, noise, schedule, steps, guidance,
                                             args.batch)
                gen_s = time.perf_counter() - t0
                grids[name] = generate_set(ort, grid_labels, grid_noise, schedule, steps,
                                           guidance, args.batch)
                feats[name] = metrics.inception_features(net, samples[name], progress=True,
                                                         desc=name)
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, images=samples[name], feats=feats[name], grid=grids[name],
                         labels=labels, gen_seconds=gen_s)
            fid = metrics.fid_from_features(feats[name], feats_real)
            kid, kid_std = metrics.kid_from_features(feats[name], feats_real)
            row = {"fid": fid, "kid": kid, "kid_std": kid_std}
            if name != "off":
                diff = np.abs(samples[name].astype(np.int16) - samples["off"].astype(np.int16))
                row["fid_to_off"] = metrics.fid_from_features(feats[name], feats["off"])
                row["kid_delta"] = paired_kid_delta(feats[name], feats["off"], feats_real)
                row["mad_to_off"] = float(diff.mean())
                row["max_mad_to_off"] = float(diff.reshape(len(diff), -1).mean(1).max())
            results["quality"][name] = row
            save_png(grid_image(grids[name], cols=cfg.num_classes), img_dir / f"{name}.png")
            print(f"  {name:18s} FID {fid:6.2f}  KID {kid * 1e3:6.2f} ± {kid_std * 1e3:.2f}e-3  "
                  + (f"FID-to-off {row['fid_to_off']:5.2f}  MAD {row['mad_to_off']:.2f}"
                     if name != "off" else "")
                  + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
        results["num_samples"] = args.num
        results["num_real"] = len(feats_real)
        pick = [k for k in settings if not k.endswith("-fresh")]
        comparison_image({k: grids[k][: cfg.num_classes] for k in pick}).save(
            img_dir / "compare.png")

    out = args.json or work / "results.json"
    if out.is_file():  # keep the part of an earlier run of the same study that was skipped now
        old = json.loads(out.read_text())
        same = all(old.get(k) == json.loads(json.dumps(results[k]))
                   for k in ("model", "sampler", "settings"))
        for part in ("latency", "quality", "num_samples", "num_real"):
            if same and part in old and part not in results:
                results[part] = old[part]
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    print(markdown_table(results))


def markdown_table(results: dict[str, Any]) -> str:
    """The docs/sharing.md table: one row per setting."""
    lat = results.get("latency", {})
    q = results.get("quality", {})
    head = ["setting", "DiT calls / img"]
    for b in lat:
        head += [f"{b} ms / img", f"{b} speed-up"]
    if q:
        n = results.get("num_samples")
        head += [f"FID (N={n})", "KID x1e3", "ΔKID x1e3 vs off [90% CI]", "FID to off",
                 "pixel MAD to off"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in results["settings"].items():
        cells = [f"`{name}`", str(s["dit_calls"])]
        for b in lat:
            sec = lat[b]["seconds"]
            cells += [f"{sec[name] * 1e3:.0f}", f"{sec['off'] / sec[name]:.2f}x"]
        if q:
            r = q[name]
            dk = r.get("kid_delta")
            delta = "—" if dk is None else (f"{dk[0] * 1e3:+.2f} [{dk[1] * 1e3:+.2f}, "
                                             f"{dk[2] * 1e3:+.2f}]")
            cells += [f"{r['fid']:.2f}", f"{r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}",
                      delta, f"{r.get('fid_to_off', 0.0):.2f}", f"{r.get('mad_to_off', 0.0):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
