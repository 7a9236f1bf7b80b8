"""The backends a benchmark knows, and the names every part of it shares."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from runtimes.errors import DecoError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CFG_MODES = ("fast", "reference")
REFERENCE = "torch-reference"
PROGRESS_MARK = "@deco-bench-progress"


class BenchError(DecoError, RuntimeError):
    """The benchmark cannot produce a trustworthy report (e.g. the reference row failed)."""


@dataclass(frozen=True)
class BackendKind:
    """A row family: how it is created and what it needs.

    family: "torch" (runs the checkpoint) or "bundle" (runs the bundle's artefacts).
    runtime: the manifest runtime whose artefacts a bundle row reads.
    provider: ONNX Runtime execution provider short name, for onnxruntime rows.
    loader: the `runtimes.load` backend name of a bundle row (None: the runtime's own).
    on_cpu: the row's matrix work runs on this machine's CPU (a torch row: on a CPU device),
        so the CPU's measured GEMM peak is its roofline.
    """

    name: str
    family: str
    description: str
    runtime: str | None = None
    provider: str | None = None
    loader: str | None = None
    on_cpu: bool = False


BACKENDS: tuple[BackendKind, ...] = (
    BackendKind(REFERENCE, "torch",
                "PyTorch eager fp32, [uncond; cond] every step (the reference sampler)",
                on_cpu=True),
    BackendKind("torch", "torch", "PyTorch eager (bf16: CPU or CUDA autocast)", on_cpu=True),
    BackendKind("torch-compile", "torch", "PyTorch, DiT and decoder under torch.compile",
                on_cpu=True),
    BackendKind("torch-cuda", "torch", "PyTorch CUDA: compiled, one CUDA graph per whole step"),
    BackendKind("onnxruntime-cpu", "bundle", "ONNX Runtime, CPUExecutionProvider", "onnx", "cpu",
                on_cpu=True),
    BackendKind("openvino-cpu", "bundle",
                "OpenVINO CPU on the fp32 ONNX graphs (bf16: inference precision)", "onnx",
                loader="openvino", on_cpu=True),
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
    "openvino": ("openvino-cpu",),
    "ov": ("openvino-cpu",),
}
# The GEMM peak that bounds a row of each precision (fp16 on a CPU computes in fp32).
PEAK_PRECISION = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16", "int8": "int8"}
OPENVINO_PRECISIONS = ("fp32", "bf16")
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
