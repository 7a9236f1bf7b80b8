"""Sample grids during training and evaluation, through the one runtime sampler.

`euler_sample` is the reference ``EulerSampler`` setting (grid linspace(0, 1 − 1/N, N) then 1.0,
from noise at t = 0, guidance v = v_u + w·(v_c − v_u) while t > interval_low) run by
`runtimes.sampler.sample` on the PyTorch backend, so training previews and evaluation images
come from the same code as ``deco sample`` and every exported bundle. `grid_labels` lays out
training's preview grids; `runtimes.image` turns samples into uint8 images and grids.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from runtimes.sampler import SamplerConfig, sample

__all__ = ["euler_sample", "grid_labels"]


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
    """Integrate dx/dt = v(x, t, y) from t = 0 (``noise``) to t = 1; returns (B, C, H, W) on
    ``noise``'s device.

    ``labels`` are class labels (B,) or, for text-to-image, text embeddings (B, L, C) with
    ``uncond`` the unconditional (empty-prompt) embeddings of the same shape. ``autocast`` runs
    the network in bfloat16. The model's train/eval mode is left as it was.
    """
    from deco_export.backends.torch_backend import TorchBackend

    was_training = model.training
    try:
        backend = TorchBackend(model, device=noise.device,
                               precision="bf16" if autocast else "fp32")
        config = SamplerConfig(solver="euler", num_steps=num_steps, guidance=cfg_scale,
                               guidance_interval=(interval_low, 1.0), guidance_bounds="(]")
        cond = labels.cpu().numpy()
        if cond.ndim == 3:  # text embeddings: the unconditional rows are given, or unused (w = 1)
            negative = (uncond.float().cpu().numpy() if uncond is not None
                        else np.zeros_like(cond, dtype=np.float32))
            x = sample(backend, noise.float().cpu().numpy(), cond, config, uncond=negative)
        else:
            null = model.config.null_class if null_class is None else null_class
            x = sample(backend, noise.float().cpu().numpy(), cond, config, null_class=null)
    finally:
        model.train(was_training)
    return torch.from_numpy(np.asarray(x)).to(noise.device)


def grid_labels(num_classes: int, per_class: int = 8, max_rows: int = 10) -> torch.Tensor:
    """Row-per-class labels for a sample grid: min(num_classes, max_rows) evenly spaced classes."""
    rows = min(num_classes, max_rows)
    classes = torch.linspace(0, num_classes - 1, rows).round().long()
    return classes.repeat_interleave(per_class)

