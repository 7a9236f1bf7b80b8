"""Exponential moving average of the model weights (the weights every reported result uses)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA:
    """An fp32 EMA copy: ema ← decay·ema + (1 − decay)·θ after every optimizer step.

    Like the reference, the update starts at step 0 with the full decay (no warm-up). The copy
    is a separate module built from the same constructor, so it carries no training hooks and
    can be sampled or exported on its own.
    """

    def __init__(self, model: nn.Module, ema_model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = ema_model.float().eval().requires_grad_(False)
        self.model.load_state_dict(model.state_dict())
        self._src = [p for p in model.parameters()]
        self._dst = [p for p in self.model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._dst, [p.detach().float() for p in self._src], 1.0 - self.decay)
