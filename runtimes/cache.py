"""Where the package keeps what it can rebuild: one root, one environment variable.

Compiled OpenVINO models, Core ML compilations, the TensorRT timing cache, traced ONNX graphs
and converted Core ML programs, datasets and text-embedding caches all live in
``cache_dir(kind)``: ``$DECO_CACHE_DIR/<kind>``, else
``$XDG_CACHE_HOME/deco/<kind>``, else ``~/.cache/deco/<kind>``. Every entry there is keyed by
what it depends on, so removing the folder costs only time.

The names read before there was one root still work for a while, with a warning that names
the new one: ``DECO_CACHE`` (the training caches' root) and ``DECO_COREML_CACHE`` (the Core
ML compilations' folder itself).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "DECO_CACHE_DIR"
_DEPRECATED_ROOT_ENV = "DECO_CACHE"
_DEPRECATED_KIND_ENV = {"coreml": "DECO_COREML_CACHE"}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"${old} is deprecated and will stop being read; set ${CACHE_ENV} instead "
                  f"(it would name {new})", FutureWarning, stacklevel=3)


def _root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get(_DEPRECATED_ROOT_ENV):
        _deprecated(_DEPRECATED_ROOT_ENV, "the same folder")
        return Path(os.environ[_DEPRECATED_ROOT_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deco"


def cache_dir(kind: str | None = None) -> Path:
    """The cache folder of ``kind`` (``"openvino"``, ``"coreml"``, ``"tensorrt"``, ``"fid"``,
    ...), or the root without one. Nothing is created: a reader that finds nothing there
    rebuilds, and a writer creates the folder it writes."""
    if kind is None:
        return _root()
    old = _DEPRECATED_KIND_ENV.get(kind)
    if old and os.environ.get(old) and not os.environ.get(CACHE_ENV):
        _deprecated(old, "its parent folder")
        return Path(os.environ[old])
    return _root() / kind
