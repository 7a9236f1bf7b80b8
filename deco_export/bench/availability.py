"""Planning: which rows run on this machine, and why the others cannot."""

from __future__ import annotations

import shutil
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from runtimes.bundle import ONNX_PRECISIONS

from ..machine import has_bf16, missing_bf16_reason
from .catalogue import (
    BACKENDS,
    KINDS,
    OPENVINO_PRECISIONS,
    ORT_PROVIDER_NAMES,
    PRECISIONS,
    REFERENCE,
    BackendKind,
    RowSpec,
)
from .settings import BenchSettings


def has_artifacts(manifest: Any, runtime: str, precision: str) -> bool:
    return all(manifest.get_artifact(runtime, g, precision) is not None for g in ("dit", "decoder"))


def _bundle_precisions(manifest: Any, runtime: str) -> list[str]:
    have = {a.precision for a in manifest.artifacts if a.runtime == runtime}
    return [p for p in PRECISIONS if p in have and has_artifacts(manifest, runtime, p)]


def natural_precisions(kind: BackendKind, manifest: Any, cuda: bool) -> list[str]:
    """The precisions a backend is benchmarked at when none are asked for."""
    if kind.name == REFERENCE:
        return ["fp32"]
    if kind.name == "torch-cuda":
        return ["bf16"]
    if kind.family == "torch":
        return ["fp32", "bf16"] if cuda or has_bf16() else ["fp32"]
    if kind.loader == "openvino":
        # bf16 is listed even where the CPU lacks it: its row then says why it did not run.
        return list(OPENVINO_PRECISIONS)
    have = _bundle_precisions(manifest, kind.runtime or "") if manifest is not None else []
    if have:
        return have
    return ["fp32", "fp16"] if kind.runtime == "onnx" else ["fp16"]


def unavailable_reason(kind: BackendKind, precision: str, manifest: Any, cuda: bool,
                       bundle: Path | None = None) -> str | None:
    """Why ``kind`` at ``precision`` cannot run here, or None when it can (as far as a cheap
    check can tell: a worker that then fails reports its own error)."""
    name = kind.name
    if precision == "int8" and (kind.runtime != "onnx" or kind.loader is not None):
        return ("int8 is ONNX Runtime's dynamically quantized graph; this backend runs fp32, "
                "fp16 or bf16")
    if kind.family == "torch":
        if find_spec("torch") is None:
            return "No module named 'torch'; pip install 'deco-export[torch]'"
        if name == "torch-cuda" and not cuda:
            return "needs a CUDA GPU: torch.cuda.is_available() is False"
        if precision == "bf16" and not cuda and not has_bf16():
            return f"{missing_bf16_reason()}; PyTorch would emulate it"
        if name == "torch-compile" and not cuda and not any(
                shutil.which(c) for c in ("c++", "g++", "clang++")):
            return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH"
        return None
    if kind.loader == "openvino":
        if find_spec("openvino") is None:
            return "No module named 'openvino'; pip install 'deco-export[openvino]'"
        if precision not in OPENVINO_PRECISIONS:
            return (f"OpenVINO runs {' or '.join(OPENVINO_PRECISIONS)} (bf16 as an inference "
                    f"precision on the fp32 graphs)")
        if precision == "bf16" and not has_bf16():
            return f"{missing_bf16_reason()}; the openvino backend refuses to run it"
        precision = "fp32"  # the artefacts it reads
    elif kind.runtime == "onnx":
        if find_spec("onnxruntime") is None:
            return "No module named 'onnxruntime'; pip install onnxruntime"
        import onnxruntime

        full = ORT_PROVIDER_NAMES[kind.provider or "cpu"]
        offered = onnxruntime.get_available_providers()
        if full not in offered:
            hint = {"cuda": "install onnxruntime-gpu (instead of onnxruntime) on a machine with "
                            "an NVIDIA GPU",
                    "tensorrt": "install onnxruntime-gpu and the TensorRT libraries",
                    "coreml": "only macOS builds of onnxruntime have it"}.get(kind.provider, "")
            return (f"{full} not available (this onnxruntime {onnxruntime.__version__} offers "
                    f"{', '.join(offered)}); {hint}").rstrip("; ")
        if precision not in ONNX_PRECISIONS:
            return f"ONNX export writes {', '.join(ONNX_PRECISIONS)} graphs only"
    elif kind.runtime == "tensorrt":
        if find_spec("tensorrt") is None:
            return ("No module named 'tensorrt'; TensorRT runs on NVIDIA GPUs: pip install "
                    "'deco-export[tensorrt]'")
        if not cuda:
            return "TensorRT needs an NVIDIA GPU and driver"
    elif kind.runtime == "coreml":
        if sys.platform != "darwin":
            return (f"predict needs macOS: Core ML runs models only on macOS (this is "
                    f"{sys.platform}; coremltools here converts only)")
        if find_spec("coremltools") is None:
            return "No module named 'coremltools'; pip install 'deco-export[coreml]'"
    if manifest is not None and not has_artifacts(manifest, kind.runtime or "", precision):
        have = _bundle_precisions(manifest, kind.runtime or "")
        where = bundle or "BUNDLE"
        build = {"onnx": f"deco export onnx CHECKPOINT {where} --precision {precision}",
                 "tensorrt": f"deco export tensorrt {where} --precision {precision}",
                 "coreml": f"deco export coreml CHECKPOINT {where} --precision {precision}"}
        return (f"the bundle has no {kind.runtime} {precision} dit/decoder (it has "
                f"{', '.join(have) or 'none'}); build them with `{build[kind.runtime or 'onnx']}`")
    return None


def plan_rows(settings: BenchSettings, manifest: Any, cuda: bool,
              bundle: Path | None = None) -> tuple[list[RowSpec], list[dict[str, str]]]:
    """(rows to run, rows that cannot run here with the reason), reference first."""
    chosen = settings.backends if settings.backends is not None else tuple(KINDS)
    runs: list[RowSpec] = [RowSpec(REFERENCE, "fp32", "reference")]
    unavailable: list[dict[str, str]] = []
    for kind in BACKENDS:
        if kind.name == REFERENCE or kind.name not in chosen:
            continue
        precisions = (list(settings.precisions) if settings.precisions is not None
                      else natural_precisions(kind, manifest, cuda))
        if kind.name in settings.skip:  # listed, so a reader knows it was left out on purpose
            unavailable += [{"backend": kind.name, "precision": p, "status": "skipped",
                             "reason": "left out by --skip (--quick skips torch-compile)"}
                            for p in precisions]
            continue
        for precision in precisions:
            reason = unavailable_reason(kind, precision, manifest, cuda, bundle)
            if reason is None:
                runs.append(RowSpec(kind.name, precision, settings.cfg_mode))
            else:
                unavailable.append({"backend": kind.name, "precision": precision,
                                    "reason": reason})
    return runs, unavailable
