"""What a Core ML export can target (deployment targets, compute units, precisions,
compressions), and coremltools itself, imported lazily and quietly."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

from runtimes.errors import DecoError

from ..graphs import quiet

INSTALL_HINT = "pip install 'deco-export[coreml]'"
PRECISIONS = ("fp16", "fp32")
DEPLOYMENT_TARGETS = ("macOS14", "macOS15", "macOS26", "iOS17", "iOS18", "iOS26")
DEFAULT_TARGET = "macOS14"
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
DEFAULT_COMPUTE_UNITS = "ALL"
COMPRESSIONS = ("none", "int8", "palette6", "palette4")
DEFAULT_BATCH_SIZES = (1, 2)
PARITY_BATCHES = (1, 2)


class CoreMLExportError(DecoError, ValueError):
    """A model or setting Core ML cannot take; the message names the layer or the option."""


def import_coremltools() -> Any:
    """coremltools, quietly; a one-line error with the install command when it is missing."""
    try:
        with quiet_logs():
            import coremltools
    except ImportError as err:
        raise ModuleNotFoundError(
            f"coremltools is not installed; install it with {INSTALL_HINT}",
            name="coremltools",
        ) from err
    return coremltools


def quiet_logs() -> contextlib.AbstractContextManager[None]:
    """coremltools logs that its macOS-only proxies are missing on Linux and that it was not
    tested with this torch; both are expected here and drown the useful output."""
    return quiet("coremltools")


@contextlib.contextmanager
def quiet_conversion(verbose: bool) -> Iterator[None]:
    """Silence coremltools' per-pass progress bars (conversion and compression) unless
    ``verbose``."""
    if verbose:
        yield
        return
    import importlib

    import tqdm

    patched = [("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
               ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
               ("coremltools.optimize.coreml._quantization_passes", "tqdm"),
               ("coremltools.optimize.coreml._post_training_quantization", "tqdm")]
    saved = []
    for module_name, attr in patched:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, partial(tqdm.tqdm, disable=True))
    try:
        with quiet_logs():
            yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def deployment_target(ct: Any, name: str) -> Any:
    if name not in DEPLOYMENT_TARGETS:
        raise CoreMLExportError(
            f"unknown deployment target {name!r}; choose one of {', '.join(DEPLOYMENT_TARGETS)}"
        )
    return getattr(ct.target, name)


def joint_enumerated_shapes(ct: Any, target: Any) -> bool:
    """Whether several inputs may carry enumerated shapes (iOS 18 / macOS 15 and later)."""
    return target >= ct.target.iOS18


def compute_unit(ct: Any, name: str) -> Any:
    if name not in COMPUTE_UNITS:
        raise CoreMLExportError(
            f"unknown compute units {name!r}; choose one of {', '.join(COMPUTE_UNITS)}"
        )
    return getattr(ct.ComputeUnit, name)


def can_predict() -> bool:
    """Core ML runs models only on macOS."""
    return sys.platform == "darwin"


NOT_RUN_REASON = (
    "Core ML predicts only on macOS; this export ran on {platform}, so only its structure was "
    "checked. Re-export on a Mac to record parity"
)
