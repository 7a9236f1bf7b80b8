"""Quality of a text-to-image emoji model: FID/KID, prompt following, and a prompt grid.
Produced docs/eval/default-t2i.json, the README's text-to-image grid and figures, and the
text-to-image part of docs/eval/speckles.md.

    PYTHONPATH=. python scripts/studies/eval_t2i.py default-t2i            # the embedded default
    PYTHONPATH=. python scripts/studies/eval_t2i.py runs/my-t2i/model --num-samples 200 --follow 100

Every image is sampled as ``deco sample MODEL --prompt ...`` samples it: the PyTorch backend,
the model's own sampler defaults (for a T2I model the release's AB2, 25 steps, CFG 4 inside
(0, 1), shift 3) and the text encoder its metadata names. Measured:

- FID/KID of ``--num-samples`` samples, prompted with the Unicode names of evenly spaced
  training emoji, against the held-out emoji and against as many training emoji;
- prompt following: for ``--follow`` base (no skin tone) training emoji, one image from the
  emoji's Unicode name, then all base emoji (training and held out, about 1,870) ranked by the
  cosine similarity of FID-Inception pool features to it; top-1 / top-5 accuracy of the
  prompted emoji, at the model's guidance and at guidance 1 (no CFG), next to chance;
- isolated bright pixels per sample, with the detector of ``scripts/studies/speckle_study.py``, and
  that script's noise-removal measurement on training emoji with their names as prompts (the
  slope of the noise estimate x_t - t v on the true noise at t = 0.5 ... 0.99; 1 removes it
  all), to set beside the c2i default's in ``docs/eval/speckles.json``;
- a grid of ``GRID_PROMPTS`` (fixed before any sample was looked at) x ``GRID_SEEDS``.

Writes ``--out`` (JSON) and ``--grid`` (PNG). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from training.metrics import denoise_error, prompt_following, speckles

# The README grid: chosen before sampling; training and held-out names mixed.
GRID_PROMPTS = (
    "red heart",
    "grinning face",
    "pizza",
    "rocket",
    "sun",
    "flag: Japan",
    "green apple",
    "cat face",
)
GRID_SEEDS = (0, 1, 2, 3)
BATCH = 100
REAL_TRAIN = 1000  # training emoji whose features are cached (the FID reference set)


def sample_prompts(pipe, prompts: Sequence[str], seeds: Sequence[int], **settings) -> np.ndarray:
    """uint8 (N, H, W, C) images, one per prompt, each from its own seed."""
    out = []
    for i in range(0, len(prompts), BATCH):
        result = pipe.generate(prompt=list(prompts[i : i + BATCH]),
                               seed=list(seeds[i : i + BATCH]), output_type="uint8", **settings)
        out.append(np.asarray(result.images))
    return np.concatenate(out)


def real_features(cache: Path, size: tuple[int, int], n_train: int, feats) -> tuple:
    """Inception features of every base emoji, the held-out split and ``n_train`` training
    emoji (a fixed random subset), cached in one file."""
    from training.data import _SKIN_TONES, emoji_split, read_emoji_test, render_emoji

    seqs, _, _ = read_emoji_test()
    base_all = [s for s in seqs if not any(ch in _SKIN_TONES for ch in s)]
    key = f"{size[0]}x{size[1]}_{len(base_all)}_{n_train}"
    if cache.is_file() and str(np.load(cache)["key"]) == key:
        z = np.load(cache)
        return z["base"], z["test"], z["train"]
    train_ds, _ = emoji_split("train", size)
    test_ds, _ = emoji_split("test", size)
    f_base = feats(render_emoji(base_all, size))
    f_test = feats(test_ds.images.numpy())
    kk = np.random.default_rng(0).permutation(len(train_ds))[:n_train]
    f_train = feats(train_ds.images.numpy()[kk])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=key, base=f_base, test=f_test, train=f_train)
    return f_base, f_test, f_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default-t2i")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--follow", type=int, default=200)
    ap.add_argument("--out", default="docs/eval/default-t2i.json")
    ap.add_argument("--grid", default="docs/img/default-t2i-grid.png")
    ap.add_argument("--features", default="runs/eval-t2i-features.npz",
                    help="cache of the real images' Inception features")
    args = ap.parse_args()
    t0 = time.time()

    def log(*a) -> None:
        print(f"[{time.time() - t0:5.0f}s]", *a, file=sys.stderr, flush=True)

    import torch

    from deco_export.checkpoint import read_metadata
    from deco_export.machine import cpu_features, cpu_model
    from deco_export.sampling import open_pipeline
    from deco_export.sources import load_model, model_path
    from runtimes.image import save_grid
    from training.captions import emoji_captions
    from training.data import _SKIN_TONES, emoji_split, read_emoji_test
    from training.metrics import (
        fid_from_features,
        inception_features,
        kid_from_features,
        load_inception,
    )

    pipe = open_pipeline(args.model)
    c = pipe.model_config
    if not c.is_text_to_image:
        raise SystemExit(f"{args.model} is a class-conditional model; this scores text-to-image")
    defaults = pipe.sampler_defaults.to_dict()

    train_ds, train_seqs = emoji_split("train", c.image_size)
    seqs, _, _ = read_emoji_test()
    names = {s: caps[0] for s, caps in zip(seqs, emoji_captions(seqs), strict=True)}
    base_all = [s for s in seqs if not any(ch in _SKIN_TONES for ch in s)]
    train_set = set(train_seqs)

    grid_prompts = [p for p in GRID_PROMPTS for _ in GRID_SEEDS]
    grid = sample_prompts(pipe, grid_prompts, [s for _ in GRID_PROMPTS for s in GRID_SEEDS])
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, args.grid, cols=len(GRID_SEEDS), scale=4, pad_value=255)
    log("grid written to", args.grid)

    t_gen = time.time()
    k = np.linspace(0, len(train_seqs) - 1, args.num_samples).round().astype(int)
    prompts = [names[train_seqs[i]] for i in k]
    samples = sample_prompts(pipe, prompts, list(range(len(prompts))))
    per_image_s = (time.time() - t_gen) / len(samples)
    log(f"{len(samples)} samples ({per_image_s:.3f} s per image)")

    base_train = [s for s in base_all if s in train_set]
    j = np.linspace(0, len(base_train) - 1, args.follow).round().astype(int)
    follow = [base_train[i] for i in j]
    f_prompts = [names[s] for s in follow]
    f_seeds = [10_000 + i for i in range(len(follow))]
    follow_imgs = {"cfg": sample_prompts(pipe, f_prompts, f_seeds),
                   "guidance1": sample_prompts(pipe, f_prompts, f_seeds, guidance=1.0)}
    log("prompt-following samples")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    kk = torch.linspace(0, len(train_ds) - 1, 96).round().long()
    text = torch.from_numpy(pipe.text_encoder.encode([names[train_seqs[i]] for i in kk]))
    model, _ = load_model(args.model)
    shift = float((read_metadata(model_path(args.model)).get("training") or {})
                  .get("config", {}).get("time_shift", 1.0))
    with torch.no_grad():
        noise_removal = denoise_error(model.eval(), train_ds.images[kk], text, train_shift=shift)
    log("noise removal")

    net = load_inception()

    def feats(x: np.ndarray) -> np.ndarray:
        return inception_features(net, x, batch_size=50)

    f_base, f_test, f_train = real_features(Path(args.features), c.image_size,
                                            max(args.num_samples, REAL_TRAIN), feats)
    f_train = f_train[: args.num_samples]
    log("real features")
    f_samples = feats(samples)
    result: dict = {
        "model": args.model, "sampler": defaults, "num_samples": len(samples),
        "seconds_per_image": round(per_image_s, 4),
        "cpu": cpu_model(), "cpu_features": cpu_features(), "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    for name, ref in (("held_out", f_test), ("train", f_train)):
        kid, kid_std = kid_from_features(f_samples, ref, num_subsets=100)
        result[f"fid_{name}"] = fid_from_features(f_samples, ref)
        result[f"kid_{name}"], result[f"kid_{name}_std"] = kid, kid_std
        result[f"num_real_{name}"] = len(ref)
    index = {s: i for i, s in enumerate(base_all)}
    target = np.array([index[s] for s in follow])
    for name, imgs in follow_imgs.items():
        for key, value in prompt_following(feats(imgs), f_base, target).items():
            result[f"follow_{key}_{name}"] = value
    result.update({
        "follow_n": len(follow), "follow_candidates": len(base_all),
        "follow_chance_top1": 1 / len(base_all), "follow_chance_top5": 5 / len(base_all),
        "speckles_per_image": float(speckles(samples).mean()),
        "train_time_shift": shift, "noise_removal_train": noise_removal,
        "grid_prompts": list(GRID_PROMPTS), "grid_seeds": list(GRID_SEEDS),
        "seconds": round(time.time() - t0),
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
