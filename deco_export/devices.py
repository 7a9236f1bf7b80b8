"""The one check of a ``--device`` name for the PyTorch paths (sampling, training): a device
torch does not know, or one this machine does not have, is one line naming it and the fix, not
torch's RuntimeError traceback."""

from __future__ import annotations

from typing import Any

__all__ = ["torch_device"]


def torch_device(name: str) -> Any:
    """``torch.device(name)``, checked to exist here; ValueError otherwise."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device torch knows; use cpu, cuda, "
                         "cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r} was asked for but torch sees no CUDA GPU; use "
                             "--device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} was asked for but torch sees {count} CUDA "
                             f"GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was asked for but torch has no MPS here; use "
                         "--device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: deco runs on cpu, cuda or mps")
    return device
