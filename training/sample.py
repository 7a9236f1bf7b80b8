"""A small Euler sampler on the model itself, for sample grids during training and evaluation.

It follows the reference ``EulerSampler``: grid linspace(0, 1 − 1/N, N) then 1.0, start from
noise at t = 0, one network call per step on the batch [uncond; cond], guidance
v = v_u + w·(v_c − v_u) only while t > interval_low (strict, float32), plain Euler steps up to
t = 1. Production sampling, with its solvers and backends, lives in ``runtimes``; this stays
here so training needs nothing but the nn.Module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

__all__ = ["euler_sample", "grid_labels", "save_grid", "to_uint8"]


@torch.no_grad()
def euler_sample(
    model: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    interval_low: float = 0.1,
    null_class: int | None = None,
    autocast: bool = False,
    uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t, y) from t = 0 (``noise``) to t = 1; returns (B, C, H, W).

    ``labels`` are class labels (B,) or, for text-to-image, text embeddings (B, L, C) with
    ``uncond`` the unconditional (empty-prompt) embeddings of the same shape.
    """
    grid = torch.cat([torch.linspace(0.0, 1.0 - 1.0 / num_steps, num_steps), torch.ones(1)])
    x = noise.float()
    b = x.shape[0]
    guided = cfg_scale != 1.0
    if uncond is None and guided:
        null = model.config.null_class if null_class is None else null_class
        uncond = torch.full_like(labels, null)
    y = torch.cat([uncond, labels]) if guided else labels
    dev = x.device
    for i in range(num_steps):
        t_cur = grid[i]
        xin = torch.cat([x, x]) if guided else x
        t = t_cur.to(dev).expand(xin.shape[0])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            v = model(xin, t, y).float()
        if guided:
            v_u, v_c = v[:b], v[b:]
            v = v_u + cfg_scale * (v_c - v_u) if t_cur > interval_low else v_c
        x = x + v * (grid[i + 1] - t_cur).item()
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) → uint8 (B, H, W, C) as the reference: clip((x+1)·127.5 + 0.5)."""
    u = torch.clamp((x.float() + 1.0) * 127.5 + 0.5, 0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()


def grid_labels(num_classes: int, per_class: int = 8, max_rows: int = 10) -> torch.Tensor:
    """Row-per-class labels for a sample grid: min(num_classes, max_rows) evenly spaced classes."""
    rows = min(num_classes, max_rows)
    classes = torch.linspace(0, num_classes - 1, rows).round().long()
    return classes.repeat_interleave(per_class)


def save_grid(images: np.ndarray, path: str | Path, ncols: int = 8, scale: int = 1) -> Path:
    """Tile uint8 (N, H, W, C) images into one PNG (row-major, ncols per row)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / ncols)
    canvas = np.full((rows * h, ncols * w, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncols)
        canvas[r * h : (r + 1) * h, q * w : (q + 1) * w] = im
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
