"""The backends a benchmark knows, and the names every part of it shares."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CFG_MODES = ("fast", "reference")
REFERENCE = "torch-reference"
PROGRESS_MARK = "@deco-bench-progress"


class BenchError(RuntimeError):
    """The benchmark cannot produce a trustworthy report (e.g. the reference row failed)."""


@dataclass(frozen=True)
class BackendKind:
    """A row family: how it is created and what it needs.

    family: "torch" (runs the checkpoint) or "bundle" (runs the bundle's artefacts).
    runtime: the manifest runtime whose artefacts a bundle row reads.
    provider: ONNX Runtime execution provider short name, for onnxruntime rows.
    """

    name: str
    family: str
    description: str
    runtime: str | None = None
    provider: str | None = None


BACKENDS: tuple[BackendKind, ...] = (
    BackendKind(REFERENCE, "torch",
                "PyTorch eager fp32, [uncond; cond] every step (the reference sampler)"),
    BackendKind("torch", "torch", "PyTorch eager"),
    BackendKind("torch-compile", "torch", "PyTorch, DiT and decoder under torch.compile"),
    BackendKind("torch-cuda", "torch", "PyTorch CUDA: compiled, one CUDA graph per whole step"),
    BackendKind("onnxruntime-cpu", "bundle", "ONNX Runtime, CPUExecutionProvider", "onnx", "cpu"),
    BackendKind("onnxruntime-cuda", "bundle", "ONNX Runtime, CUDAExecutionProvider", "onnx",
                "cuda"),
    BackendKind("onnxruntime-tensorrt", "bundle", "ONNX Runtime, TensorrtExecutionProvider",
                "onnx", "tensorrt"),
    BackendKind("onnxruntime-coreml", "bundle", "ONNX Runtime, CoreMLExecutionProvider", "onnx",
                "coreml"),
    BackendKind("tensorrt", "bundle", "TensorRT engines, whole-step CUDA graphs", "tensorrt"),
    BackendKind("coreml", "bundle", "Core ML packages", "coreml"),
)
KINDS = {k.name: k for k in BACKENDS}
ALIASES = {
    "reference": (REFERENCE,),
    "eager": ("torch",),
    "onnxruntime": tuple(k.name for k in BACKENDS if k.name.startswith("onnxruntime-")),
    "ort": tuple(k.name for k in BACKENDS if k.name.startswith("onnxruntime-")),
    "ort-cpu": ("onnxruntime-cpu",),
    "ort-cuda": ("onnxruntime-cuda",),
    "trt": ("tensorrt",),
}
ORT_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                      "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def expand_backends(names: Iterable[str]) -> list[str]:
    """Backend names and aliases ("onnxruntime" = every ONNX Runtime provider) -> row names."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name in KINDS:
            picked: Sequence[str] = (name,)
        elif name in ALIASES:
            picked = ALIASES[name]
        else:
            known = ", ".join([*KINDS, *ALIASES])
            raise ValueError(f"unknown backend {raw!r}; choose from {known}")
        out += [p for p in picked if p not in out]
    return out


@dataclass(frozen=True)
class RowSpec:
    """One backend x precision x CFG mode: one worker process, one row per batch x steps."""

    backend: str
    precision: str
    cfg_mode: str

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}" + ("-refcfg" if self.cfg_mode == "reference"
                                                     and self.backend != REFERENCE else "")

    @property
    def kind(self) -> BackendKind:
        return KINDS[self.backend]
