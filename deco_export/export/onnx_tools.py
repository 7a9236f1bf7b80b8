"""The ONNX checks every ONNX-writing exporter shares: the checker, a quiet CPU session for
parity, and the tool versions a manifest records. Apart from `onnx` so that the text encoder's
exporter (imported by it) can use them without an import cycle."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_onnx", "ort_session", "tool_versions"]


def check_onnx(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def ort_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers))


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    versions = {"torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    except ImportError:  # pragma: no cover - onnxscript ships with the onnx extra
        pass
    return versions


def onnx_file_name(graph: str, precision: str) -> str:
    """The bundle file of ``graph`` at ``precision``: ``dit.onnx``, ``dit.fp16.onnx``, ..."""
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
