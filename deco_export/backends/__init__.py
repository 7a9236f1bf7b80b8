"""The PyTorch backends of the runtime sampler, registered by name in the runtimes registry.

* ``torch``: `torch_backend.TorchBackend`, eager (or compiled) PyTorch on any device; the
  reference path and the parity baseline of every exporter.
* ``torch-cuda``: `cuda_backend.CudaGraphBackend`, bf16 weights, torch.compile and one CUDA
  graph per sampler step.

Both run the checkpoint a bundle was exported from. This package's ``runtimes.backends`` entry
points call `register` when runtimes is first asked for one of these names, so
``runtimes.load(bundle, backend="torch")`` works wherever deco-export is installed;
`create_backend` does the same for a model already in memory (a checkpoint, no bundle).
Importing this package does not import torch: the factories are imported when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "create_backend", "register"]

#: name -> the runtimes registry factory, ``factory(bundle_dir, manifest, precision=..., ...)``.
BACKENDS = {
    "torch": "deco_export.backends.torch_backend:from_bundle",
    "torch-cuda": "deco_export.backends.cuda_backend:from_bundle",
}
# What ``runtimes.load`` verifies for these backends: artefacts of this runtime, of which a
# bundle has none; they read the source checkpoint, not the bundle's files.
CHECKPOINT_RUNTIME = "torch"


def register() -> None:
    """Register every PyTorch backend with runtimes (idempotent; imports no torch)."""
    from runtimes.pipeline import register_backend

    for name, factory in BACKENDS.items():
        register_backend(name, factory, runtime=CHECKPOINT_RUNTIME)


def create_backend(name: str, model: Any, **options: Any) -> Any:
    """A PyTorch backend for ``model`` by its registered name (``options``: device, precision,
    compile, ...), through the same registry as ``runtimes.load``."""
    import runtimes

    register()
    return runtimes.create_backend(name, None, None, model=model, **options)
