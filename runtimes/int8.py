"""int8 graphs and the CPU they were proven on.

An int8 graph passes its parity gate on the CPU the export ran on; ONNX Runtime's integer
kernels differ by CPU kind (`runtimes.cpu.int8_kernel`), so the gate proves the images only for
that kind. The manifest records the kind with the gate's figures (``parity.end_to_end.cpu``),
and ``deco validate BUNDLE --precision int8`` re-runs the gate on another kind and records its
result beside the first (``parity.gates_by_int8_kernel``). When the graphs are loaded:

* on a kind with a passing record: nothing to say;
* on a kind with no record: one warning line naming both kinds and the command that proves it;
* on a kind whose record is below the gate: refused (`Int8GateError`), unless the caller opts
  in with ``allow_below_gate=True``.
"""

from __future__ import annotations

import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtimes.bundle import Artifact, Manifest, read_manifest, write_manifest
from runtimes.cpu import cpu_record, int8_kernel
from runtimes.errors import DecoError, DecoWarning

__all__ = [
    "GATES_KEY",
    "Int8GateError",
    "Int8KernelWarning",
    "check_int8_load",
    "int8_artifacts",
    "int8_gates",
    "record_int8_gate",
]

GATES_KEY = "gates_by_int8_kernel"
TEXT_ENCODER = "text_encoder"  # the graph whose gate is on its features, not on the images


class Int8GateError(DecoError, RuntimeError):
    """The bundle's int8 graphs were measured below their gate on this kind of CPU."""


class Int8KernelWarning(DecoWarning):
    """The bundle's int8 graphs are not yet proven on this kind of CPU."""


def int8_artifacts(manifest: Manifest, runtime: str = "onnx",
                   text_encoder: bool = False) -> list[Artifact]:
    """The int8 image graphs, or with ``text_encoder`` the int8 text encoder: each has its own
    gate (the images end to end; the encoder's features)."""
    return [a for a in manifest.artifacts if a.runtime == runtime and a.precision == "int8"
            and (a.graph == TEXT_ENCODER) == text_encoder]


def int8_gates(manifest: Manifest, runtime: str = "onnx",
               text_encoder: bool = False) -> dict[str, dict[str, Any]]:
    """The int8 gate's results by CPU kind: the export's (from its end-to-end record, or the
    text encoder's features record) and every later ``deco validate --precision int8`` on
    another kind."""
    gates: dict[str, dict[str, Any]] = {}
    key, figure = ("features", "snr_db") if text_encoder else ("end_to_end", "psnr_db")
    for artifact in int8_artifacts(manifest, runtime, text_encoder):
        e2e = artifact.parity.get(key) or {}
        kind = (e2e.get("cpu") or {}).get("int8_kernel")
        if kind and kind not in gates:
            gates[kind] = {figure: e2e.get(figure), "passed": True,
                           "cpu": e2e.get("cpu"), "by": "export"}
        for kind, record in (artifact.parity.get(GATES_KEY) or {}).items():
            gates[kind] = dict(record)
    return gates


def check_int8_load(root: str | os.PathLike[str], manifest: Manifest,
                    allow_below_gate: bool = False, runtime: str = "onnx",
                    text_encoder: bool = False) -> None:
    """Warn (one line) or refuse, as the module doc says, before int8 graphs (or, with
    ``text_encoder``, the int8 text encoder) are opened."""
    if not int8_artifacts(manifest, runtime, text_encoder):
        return
    here = int8_kernel()
    gates = int8_gates(manifest, runtime, text_encoder)
    record = gates.get(here)
    what, proves, option = (("the int8 text encoder", "its features", "text_encoder_precision")
                            if text_encoder else ("int8 graphs", "the images", "precision"))
    fix = f"`deco validate {root} --precision int8` re-runs the gate on this CPU"
    if record is None:
        gated = (f"gated on {', '.join(sorted(gates))} int8 kernels" if gates else
                 "no CPU recorded for the gate")
        warnings.warn(f"{root}: {what}: {gated}, not on this CPU's ({here}); {proves} "
                      f"are not proven here: {fix}", Int8KernelWarning, stacklevel=3)
    elif not record.get("passed") and not allow_below_gate:
        figure = record.get("snr_db" if text_encoder else "psnr_db")
        raise Int8GateError(
            f"{root}: {what}: {figure} dB from PyTorch fp32 on this CPU's {here} int8 "
            f"kernels, below the gate: use {option}='fp32', or pass "
            "allow_below_gate=True (--allow-below-gate) to run them anyway")


def record_int8_gate(root: str | os.PathLike[str], psnr_db: float, passed: bool,
                     threshold_db: float, runtime: str = "onnx",
                     text_encoder: bool = False) -> None:
    """Record an int8 gate run on this CPU in the bundle's manifest (under the bundle's lock,
    written atomically), so later loads on this kind of CPU know its result. ``text_encoder``:
    the int8 text encoder's gate (``psnr_db`` is then its features' SNR)."""
    from runtimes.locks import lock  # the writers' machinery, loaded by writers only

    root = Path(root)
    figure = "snr_db" if text_encoder else "psnr_db"
    entry = {figure: round(float(psnr_db), 2), "passed": bool(passed),
             "threshold_db": threshold_db, "cpu": cpu_record(), "by": "validate",
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    with lock(root):
        manifest = read_manifest(root)
        for artifact in int8_artifacts(manifest, runtime, text_encoder):
            artifact.parity.setdefault(GATES_KEY, {})[int8_kernel()] = entry
        write_manifest(root, manifest)
