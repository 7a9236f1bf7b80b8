"""Planning: which rows run on this machine, and why the others cannot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtimes.bundle import RUNTIMES
from runtimes.catalogue import BackendEntry
from runtimes.cpu import has_bf16

from .catalogue import (
    KINDS,
    PRECISIONS,
    REFERENCE,
    BackendKind,
    RowSpec,
    backend_kinds,
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
    if kind.runs_checkpoint:
        if kind.entry.precisions is not None and "fp32" not in kind.entry.precisions:
            return list(kind.entry.precisions[:1])  # torch-cuda: bf16
        return ["fp32", "bf16"] if cuda or has_bf16() else ["fp32"]
    if kind.entry.precisions is not None and "fp32" in kind.entry.precisions and (
            kind.entry.artifact_precision(kind.entry.precisions[-1]) == "fp32"):
        # Every precision reads the fp32 graphs (OpenVINO): all are listed, even where the CPU
        # lacks one, so its row then says why it did not run.
        return list(kind.entry.precisions)
    have = _bundle_precisions(manifest, kind.runtime or "") if manifest is not None else []
    if have:
        return have
    return ["fp32", "fp16"] if kind.runtime == "onnx" else ["fp16"]


def _runs_int8(entry: BackendEntry) -> bool:
    return "int8" in entry.precisions if entry.precisions is not None else (
        entry.runtime == "onnx")


def unavailable_reason(kind: BackendKind, precision: str, manifest: Any, cuda: bool,
                       bundle: Path | None = None) -> str | None:
    """Why ``kind`` at ``precision`` cannot run here, or None when it can (as far as a cheap
    check can tell: a worker that then fails reports its own error). The backend's own probe
    (its catalogue entry) says what its library and hardware need."""
    entry = kind.entry
    if precision == "int8" and not _runs_int8(entry):
        return ("int8 is ONNX Runtime's dynamically quantized graph; this backend runs fp32, "
                "fp16 or bf16")
    if not isinstance(entry.factory, str):
        return (f"{entry.name} was registered with a callable factory, which the bench's "
                f"worker processes cannot import; register it as 'module:Attribute'")
    reason = entry.unavailable_reason(precision, kind.options, cuda)
    if reason is not None or kind.runs_checkpoint or entry.runtime not in RUNTIMES:
        return reason  # no artefacts of the bundle's to look for
    reads = entry.artifact_precision(precision)
    if manifest is not None and not has_artifacts(manifest, entry.runtime, reads):
        have = _bundle_precisions(manifest, entry.runtime)
        where = bundle or "BUNDLE"
        build = {"onnx": f"deco export onnx CHECKPOINT {where} --precision {reads}",
                 "tensorrt": f"deco export tensorrt {where} --precision {reads}",
                 "coreml": f"deco export coreml CHECKPOINT {where} --precision {reads}"}
        return (f"the bundle has no {entry.runtime} {reads} dit/decoder (it has "
                f"{', '.join(have) or 'none'}); build them with "
                f"`{build.get(entry.runtime, build['onnx'])}`")
    return None


def plan_rows(settings: BenchSettings, manifest: Any, cuda: bool,
              bundle: Path | None = None) -> tuple[list[RowSpec], list[dict[str, str]]]:
    """(rows to run, rows that cannot run here with the reason), reference first."""
    chosen = settings.backends if settings.backends is not None else tuple(KINDS)
    runs: list[RowSpec] = [RowSpec(REFERENCE, "fp32", "reference")]
    unavailable: list[dict[str, str]] = []
    for kind in backend_kinds():
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
