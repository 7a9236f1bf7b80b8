"""The text path's part of `deco validate`: the gate a text-to-image bundle's text encoder and
stored negative prompt passed at export, run again.

Hashes only prove that files match the manifest, and whoever rewrote a file can rewrite its
hash. So, as the image graphs are re-run against the source checkpoint, ``text_encoder.onnx``
(fed by ``tokenizer.json``) is re-run against the PyTorch encoder it was exported from (the
directory the manifest records) prompt by prompt, and the stored negative prompt embeddings
are compared with a fresh encoding of the stored negative prompt by the bundle's encoder.
The encoder's fp16 and int8 copies are held to their gates on the features again; the int8
one's result is recorded for this kind of CPU (`runtimes.int8`), passed or not.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtimes import bundle as rb
from runtimes.cpu import int8_kernel
from runtimes.int8 import record_int8_gate
from runtimes.text_encoder import OnnxTextEncoder

from .export.text_encoder import MAX_RELATIVE_ERROR, TextEncoderExportError, text_encoder_parity
from .parity import TEXT_ENCODER_MIN_SNR

__all__ = ["TextPathError", "validate_text_path"]


class TextPathError(rb.BundleError, ValueError):
    """The bundle's text encoder or stored negative prompt no longer passes its gate."""


def validate_text_path(bundle: Path, manifest: rb.Manifest,
                       say: Callable[[str], None]) -> list[str]:
    """Report lines for the text path (none for a bundle without a text encoder); raises
    `TextPathError` naming the file that fails."""
    art = manifest.get_artifact("onnx", "text_encoder", "fp32")
    if art is None:
        return []
    encoder = OnnxTextEncoder(bundle, manifest, verify=False)
    say(f"opening {art.file}")
    encoder.tokenize([""])  # opens the session: a truncated graph fails here, by name
    lines = [_encoder_gate(encoder, art.details.get("source"), say)]
    for other in manifest.artifacts:
        if (other.runtime, other.graph) == ("onnx", "text_encoder") and other.precision != "fp32":
            reduced = OnnxTextEncoder(bundle, manifest, precision=other.precision, verify=False)
            lines.append(_encoder_gate(reduced, art.details.get("source"), say,
                                       other.precision))
    text = manifest.text
    if text is not None and isinstance(text.negative_prompt, str) and text.embeds_file:
        lines.append(_negative_gate(bundle, encoder, text.negative_prompt, text.embeds_file,
                                    say))
    return lines


def _encoder_gate(encoder: OnnxTextEncoder, source: str | None,
                  say: Callable[[str], None], precision: str = "fp32") -> str:
    name = encoder.path.name
    if not source or not (Path(source) / "config.json").is_file():
        return (f"text encoder: its source directory {source!r} is not on this machine, so "
                f"{name} was opened but not compared with it")
    from .text_encoders import TransformersTextEncoder

    say(f"re-running parity of {name} against {source}")
    reference = TransformersTextEncoder(source, encoder.max_length)
    try:
        results = text_encoder_parity(reference, encoder.path, encoder.tokenizer_path,
                                      precision)
    except TextEncoderExportError as err:
        if precision == "int8" and err.snr_db is not None:
            _record_int8(encoder.bundle_dir, err.snr_db, passed=False)
            raise TextPathError(f"{encoder.path}: {err}".replace(
                "nothing was written", "recorded in the manifest: loads of it on this kind of "
                "CPU are refused (use text_encoder_precision='fp32')")) from None
        why = str(err).removesuffix("; nothing was written")
        raise TextPathError(f"{encoder.path}: {why}; the file was changed after export: "
                            "restore it or export the bundle again") from None
    if precision != "fp32":
        snr = min(r.snr_db for r in results if r.snr_db is not None)
        where = ""
        if precision == "int8":
            _record_int8(encoder.bundle_dir, snr, passed=True)
            where = f" on {int8_kernel()} int8 kernels (recorded)"
        return (f"text encoder {precision}: {len(results)} prompts against {source}, worst "
                f"feature SNR {snr:.1f} dB{where}: passed")
    worst = max(r.max_abs_error for r in results)
    return (f"text encoder: {len(results)} prompts against {source}, worst error "
            f"{worst:.2e}: passed")


def _record_int8(bundle: Path, snr_db: float, passed: bool) -> None:
    """The int8 encoder's gate on this kind of CPU, for later loads here (`runtimes.int8`)."""
    record_int8_gate(bundle, snr_db, passed, TEXT_ENCODER_MIN_SNR["int8"], text_encoder=True)


def _negative_gate(bundle: Path, encoder: OnnxTextEncoder, prompt: str, file: str,
                   say: Callable[[str], None]) -> str:
    say(f"encoding the stored negative prompt {prompt[:40]!r} again")
    stored = np.load(bundle / file, allow_pickle=False)
    fresh = encoder.encode([prompt])
    if stored.shape != fresh.shape:
        raise TextPathError(f"{bundle / file}: shape {stored.shape}, a fresh encoding of the "
                            f"negative prompt {prompt[:40]!r} is {fresh.shape}; export again")
    error = float(np.abs(stored.astype(np.float64) - fresh).max())
    scale = max(float(np.abs(fresh).max()), 1.0)
    if not error <= MAX_RELATIVE_ERROR * scale:
        raise TextPathError(
            f"{bundle / file}: differs from a fresh encoding of the stored negative prompt "
            f"{prompt[:40]!r} by {error:.2e} (features up to {scale:.1f}); the embeddings or "
            "the prompt were changed after export: restore them or export the bundle again"
        )
    return (f"negative prompt {prompt[:40]!r}: the stored embeddings match a fresh encoding "
            f"({error:.1e})")
