"""deco-export: DeCo models, checkpoint IO, exporters and the PyTorch backend.

The top-level names import torch on first use only, so ``deco --help`` and the CLI's
process setup run before torch is loaded.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DeCo": ("deco_export.model", "DeCo"),
    "ModelConfig": ("runtimes.config", "ModelConfig"),
    "DeCoConfig": ("deco_export.config", "DeCoConfig"),  # deprecated: ModelConfig
    "get_preset": ("deco_export.config", "get_preset"),
    # A checkpoint directory or a reference .ckpt of either family -> DeCo (eval mode).
    "load_model": ("deco_export.checkpoint", "load_any"),
}

__all__ = ["DeCo", "ModelConfig", "__version__", "get_preset", "load_model"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'deco_export' has no attribute {name!r}")
