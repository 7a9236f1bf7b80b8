"""Where do the isolated bright pixels in the default model's samples come from? Produced
docs/eval/speckles.md (and docs/eval/speckles.json).

Measures, on the embedded c2i default (EMA weights; the raw weights are not shipped):

1. a speckle count per image (a pixel that differs from the median of its 8 neighbours by more
   than 64/255 in some channel while those neighbours agree within 48/255) for real held-out
   emoji and for samples under sampler variants: Euler steps, CFG on/off, CFG interval, and
   the image one step before the end, the predicted clean image clipped to [-1, 1] at every
   step, and starting noise clamped to [-2, 2]; how much of the starting noise survives in the
   samples and whether speckles sit on its tail values;
2. per-step statistics of one 100-step CFG run: |v|, the predicted clean image
   x1 = x_t + (1 - t) v, its speckle count and how much of it lies outside [-1, 1];
3. per-t one-step denoising of real training and held-out emoji: the clean-image error, its
   speckles, the slope of the noise estimate on the true noise, and how often training drew
   a t at least that large.

Writes docs/eval/speckles.json. Run: PYTHONPATH=. python scripts/studies/speckle_study.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from deco_export.model import DeCo
from runtimes.image import to_uint8
from training.data import load_dataset
from training.metrics import denoise_error, speckle_mask, speckles

OUT = Path("docs/eval/speckles.json")
PER_CLASS = 4
SEED = 0


@torch.no_grad()
def sample(model: DeCo, noise: torch.Tensor, labels: torch.Tensor, steps: int, cfg: float,
           interval: tuple[float, float] = (0.1, 1.0), trace: bool = False,
           clip_x1: bool = False) -> dict:
    """Reference Euler with CFG on ``interval`` (low exclusive, high inclusive); ``clip_x1``
    clamps the predicted clean image to [-1, 1] at every step."""
    grid = torch.cat([torch.linspace(0.0, 1.0 - 1.0 / steps, steps), torch.ones(1)])
    x = noise.clone()
    b = len(x)
    null = torch.full_like(labels, model.config.null_class)
    rows, before_last = [], None
    for i in range(steps):
        t = float(grid[i])
        guided = cfg != 1.0 and interval[0] < t <= interval[1]
        if guided:
            v = model(torch.cat([x, x]), torch.full((2 * b,), t), torch.cat([null, labels]))
            v = v[:b] + cfg * (v[b:] - v[:b])
        else:
            v = model(x, torch.full((b,), t), labels)
        if clip_x1:
            v = ((x + (1 - t) * v).clamp(-1, 1) - x) / (1 - t)
        if trace:
            x1 = x + (1 - t) * v
            rows.append({
                "t": round(t, 4),
                "v_abs_mean": float(v.abs().mean()),
                "v_abs_max": float(v.abs().max()),
                "x1_outside_unit": float((x1.abs() > 1).float().mean()),
                "x1_speckles_per_image": float(speckles(to_uint8(x1.float().numpy())).mean()),
            })  # fmt: skip
        if i == steps - 1:
            before_last = x.clone()
        x = x + (float(grid[i + 1]) - t) * v
    return {"x": x, "before_last": before_last, "trace": rows}


def noise_survival(x: torch.Tensor, noise: torch.Tensor) -> dict:
    """How much of the starting noise is left in the samples: the high-pass of the samples
    regressed on the high-pass of the noise they started from, and where speckles sit."""
    def hp(a: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(a, (1, 1, 1, 1), mode="replicate")
        return a - torch.nn.functional.avg_pool2d(padded, 3, stride=1)

    a, e = hp(x), hp(noise)
    m = speckle_mask(to_uint8(x.float().numpy()))
    tail = noise.abs().amax(1).numpy()
    return {
        "survival_slope": float((a * e).sum() / (e * e).sum()),
        "correlation": float(torch.corrcoef(torch.stack([a.flatten(), e.flatten()]))[0, 1]),
        "speckle_pixels": int(m.sum()),
        "share_of_speckles_at_noise_over_2": float((tail[m] > 2).mean()) if m.any() else 0.0,
        "share_of_pixels_at_noise_over_2": float((tail > 2).mean()),
    }


def stats(x: torch.Tensor) -> dict:
    s = speckles(to_uint8(x.float().numpy()))
    return {
        "speckles_per_image": float(s.mean()),
        "images_with_speckles": float((s > 0).mean()),
        "outside_unit": float((x.abs() > 1).float().mean()),
        "max_abs": float(x.abs().max()),
    }


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    t0 = time.time()
    model = DeCo.from_pretrained("deco_export/default").eval()
    c = model.config
    labels = torch.arange(c.num_classes).repeat_interleave(PER_CLASS)
    gen = torch.Generator().manual_seed(SEED)
    noise = torch.randn((len(labels), 3, *c.image_size), generator=gen)
    held = load_dataset("emoji", "test", c.image_size)
    train = load_dataset("emoji", "train", c.image_size)
    out: dict = {"model": "deco_export/default (EMA)", "images_per_variant": len(labels)}
    out["real"] = {
        "held_out_speckles_per_image": float(speckles(held.images.numpy()).mean()),
        "train_speckles_per_image": float(speckles(train.images.numpy()).mean()),
    }
    variants = {}
    clamped = noise.clamp(-2, 2)
    for name, steps, cfg, interval, clip, start in [
        ("euler100_cfg3.2", 100, 3.2, (0.1, 1.0), False, noise),
        ("euler25_cfg3.2", 25, 3.2, (0.1, 1.0), False, noise),
        ("euler50_cfg3.2", 50, 3.2, (0.1, 1.0), False, noise),
        ("euler50_cfg1", 50, 1.0, (0.1, 1.0), False, noise),
        ("euler50_cfg3.2_interval_0.1_0.75", 50, 3.2, (0.1, 0.75), False, noise),
        ("euler50_cfg3.2_clip_x1_every_step", 50, 3.2, (0.1, 1.0), True, noise),
        ("euler50_cfg3.2_noise_clamped_at_2", 50, 3.2, (0.1, 1.0), False, clamped),
    ]:
        r = sample(model, start, labels, steps, cfg, interval, trace=name == "euler100_cfg3.2",
                   clip_x1=clip)
        variants[name] = stats(r["x"])
        if name == "euler100_cfg3.2":
            variants["euler100_cfg3.2_one_step_before_end"] = stats(r["before_last"])
            out["trace_euler100_cfg3.2"] = r["trace"][::5] + r["trace"][-4:]
        if name in ("euler50_cfg3.2", "euler50_cfg1"):
            variants[name]["noise"] = noise_survival(r["x"], noise)
        print(name, variants[name], f"{time.time() - t0:.0f}s", file=sys.stderr)
    out["variants"] = variants
    k = torch.linspace(0, len(train) - 1, 96).round().long()
    out["denoise_error_train"] = denoise_error(model, train.images[k], train.labels[k])
    k = torch.linspace(0, len(held) - 1, 96).round().long()
    out["denoise_error_held_out"] = denoise_error(model, held.images[k], held.labels[k])
    out["seconds"] = round(time.time() - t0)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
    sys.exit(0)
