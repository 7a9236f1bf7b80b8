"""The PyTorch backends of the runtime sampler, registered by name in the backend catalogue.

* ``torch``: `torch_backend.TorchBackend`, eager (or compiled) PyTorch on any device; the
  reference path and the parity baseline of every exporter.
* ``torch-cuda``: `cuda_backend.CudaGraphBackend`, bf16 weights, torch.compile and one CUDA
  graph per sampler step.

Both run the checkpoint a bundle was exported from. This package's ``runtimes.backends`` entry
points call `register` when runtimes is first asked for one of these names, so
``runtimes.load(bundle, backend="torch")`` works wherever deco-export is installed;
`create_backend` does the same for a model already in memory (a checkpoint, no bundle).
Importing this package does not import torch: the factories are imported when used, and the
availability probe (`unavailable_reason`) only looks for the library.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from importlib.util import find_spec
from types import MappingProxyType
from typing import Any

from runtimes.catalogue import BackendEntry, BenchRow

__all__ = [
    "BACKENDS",
    "CHECKPOINT_BACKEND",
    "REFERENCE_ROW",
    "create_backend",
    "cuda_unavailable_reason",
    "register",
    "unavailable_reason",
]

# What ``runtimes.load`` verifies for these backends: artefacts of this runtime, of which a
# bundle has none; they read the source checkpoint, not the bundle's files.
CHECKPOINT_RUNTIME = "torch"
#: The backend that samples a checkpoint (``deco sample CHECKPOINT``) and runs every parity
#: gate's reference.
CHECKPOINT_BACKEND = "torch"
#: The bench's reference row: eager fp32, [uncond; cond] every step.
REFERENCE_ROW = "torch-reference"
_PRECISIONS = ("fp32", "bf16", "fp16")


def unavailable_reason(precision: str, options: Mapping[str, Any], gpu: bool) -> str | None:
    """The catalogue's probe of ``torch``: the library, native bf16 on a CPU, and a C++
    compiler for torch.compile on the CPU."""
    from runtimes.cpu import has_bf16, missing_bf16_reason

    if find_spec("torch") is None:
        return "No module named 'torch'; pip install 'deco-export[torch]'"
    if precision == "bf16" and not gpu and not has_bf16():
        return f"{missing_bf16_reason()}; PyTorch would emulate it"
    if options.get("compile") and not gpu and not any(
            shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH"
    return None


def cuda_unavailable_reason(precision: str, options: Mapping[str, Any], gpu: bool
                            ) -> str | None:
    """The catalogue's probe of ``torch-cuda``: ``torch``'s, on a CUDA GPU only."""
    if find_spec("torch") is not None and not gpu:
        return "needs a CUDA GPU: torch.cuda.is_available() is False"
    return unavailable_reason(precision, options, gpu)


#: The catalogue entries of the PyTorch backends.
BACKENDS: dict[str, BackendEntry] = {
    CHECKPOINT_BACKEND: BackendEntry(
        CHECKPOINT_BACKEND, "deco_export.backends.torch_backend:from_bundle",
        runtime=CHECKPOINT_RUNTIME, precisions=_PRECISIONS, libraries=("torch", "safetensors"),
        extra="torch", probe="deco_export.backends:unavailable_reason", source="checkpoint",
        bench_rows=(
            BenchRow(REFERENCE_ROW,
                     "PyTorch eager fp32, [uncond; cond] every step (the reference sampler)",
                     on_cpu=True, aliases=("reference",)),
            BenchRow("torch", "PyTorch eager (bf16: CPU or CUDA autocast)", on_cpu=True,
                     aliases=("eager",)),
            BenchRow("torch-compile", "PyTorch, DiT and decoder under torch.compile",
                     MappingProxyType({"compile": True}), on_cpu=True, quick=False)),
        description="PyTorch eager (or compiled) on the checkpoint the bundle names"),
    "torch-cuda": BackendEntry(
        "torch-cuda", "deco_export.backends.cuda_backend:from_bundle",
        runtime=CHECKPOINT_RUNTIME, precisions=_PRECISIONS, libraries=("torch",),
        extra="torch", probe="deco_export.backends:cuda_unavailable_reason",
        source="checkpoint",
        description="PyTorch CUDA: compiled, one CUDA graph per whole step"),
}


def register() -> None:
    """Register every PyTorch backend with runtimes (idempotent; imports no torch)."""
    from runtimes.pipeline import register_backend

    for entry in BACKENDS.values():
        register_backend(entry)


def create_backend(name: str, model: Any, **options: Any) -> Any:
    """A PyTorch backend for ``model`` by its registered name (``options``: device, precision,
    compile, ...), through the same registry as ``runtimes.load``."""
    import runtimes

    register()
    return runtimes.create_backend(name, None, None, model=model, **options)
