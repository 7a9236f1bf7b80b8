"""Stop a run at the first non-finite loss, gradient or weight, before it reaches a checkpoint.

A NaN that reaches the optimizer spreads into every weight on the next step; from there every
later checkpoint is NaN, and rotation (``--keep``) would delete the last finite one. So each
step's loss and gradient norm are checked before ``optimizer.step()``, and the weights before
each checkpoint is written: the run stops with one line naming the step, what turned
non-finite and the likely cause, and the newest checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from runtimes.errors import DecoError

__all__ = ["TrainingDiverged", "check_step", "check_weights", "gradient_max"]


class TrainingDiverged(DecoError, FloatingPointError):
    """The loss, a gradient or a weight is NaN or infinite; the run stopped before using it."""


def gradient_max(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The largest absolute gradient entry (NaN if any entry is NaN): a max, unlike a 2-norm,
    cannot overflow to inf on large but finite gradients."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(grads, math.inf)).float().max()


def _hint(step: int, first_step: int, cfg: Any) -> str:
    if step == first_step:
        return (f"the data or the loss settings, as the run's first step already fails: "
                f"check the images, --freq-weight {cfg.freq_weight:g} and --repa-weight "
                f"{cfg.repa_weight:g}")
    clip = "" if cfg.grad_clip > 0 else " or set --grad-clip 1"
    return (f"the learning rate (--lr {cfg.lr:g}), as the earlier steps were finite: lower it, "
            f"add --warmup-steps{clip}")


def check_step(step: int, first_step: int, totals: Mapping[str, torch.Tensor],
               grad_max: torch.Tensor, cfg: Any) -> None:
    """Raise `TrainingDiverged` when step ``step``'s loss parts or gradients are not finite
    (one device-to-host read per step)."""
    values = torch.stack([*(v.float().reshape(()) for v in totals.values()),
                          grad_max.float().reshape(()).to(next(iter(totals.values())).device)])
    if bool(torch.isfinite(values).all()):
        return
    parts = ", ".join(f"{k} {float(v):g}" for k, v in totals.items() if k != "grad_norm")
    what = "the loss" if not math.isfinite(float(totals["loss"])) else "a gradient"
    raise TrainingDiverged(
        f"training stopped at step {step}: {what} is not finite ({parts}, largest gradient "
        f"{float(grad_max):g}); the weights were not updated and no checkpoint was written "
        f"for it. Likely cause: {_hint(step, first_step, cfg)}"
    )


def check_weights(step: int, named: Mapping[str, Mapping[str, torch.Tensor]], cfg: Any) -> None:
    """Raise `TrainingDiverged` when a tensor of a state dict about to be checkpointed is not
    finite (named by its state dict and key), so rotation never replaces a finite checkpoint
    by a NaN one."""
    for which, state in named.items():
        for key, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TrainingDiverged(
                    f"training stopped at step {step}: the {which} weight {key} is not finite "
                    f"after the update, so no checkpoint was written for it. Likely cause: the "
                    f"learning rate --lr {cfg.lr:g} is too high: lower it, add --warmup-steps"
                    + ("" if cfg.grad_clip > 0 else " or set --grad-clip 1")
                )
