"""The text path's part of `deco validate`: the gate a text-to-image bundle's text encoder and
stored negative prompt passed at export, run again.

Hashes only prove that files match the manifest, and whoever rewrote a file can rewrite its
hash. So, as the image graphs are re-run against the source checkpoint, ``text_encoder.onnx``
(fed by ``tokenizer.json``) is re-run against the PyTorch encoder it was exported from (the
directory the manifest records) prompt by prompt, and the stored negative prompt embeddings
are compared with a fresh encoding of the stored negative prompt by the bundle's encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtimes import bundle as rb
from runtimes.text_encoder import OnnxTextEncoder

from .export.text_encoder import MAX_RELATIVE_ERROR, TextEncoderExportError, text_encoder_parity

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
    text = manifest.text
    if text is not None and isinstance(text.negative_prompt, str) and text.embeds_file:
        lines.append(_negative_gate(bundle, encoder, text.negative_prompt, text.embeds_file,
                                    say))
    return lines


def _encoder_gate(encoder: OnnxTextEncoder, source: str | None,
                  say: Callable[[str], None]) -> str:
    name = encoder.path.name
    if not source or not (Path(source) / "config.json").is_file():
        return (f"text encoder: its source directory {source!r} is not on this machine, so "
                f"{name} was opened but not compared with it")
    from .text_encoders import TransformersTextEncoder

    say(f"re-running parity of {name} against {source}")
    reference = TransformersTextEncoder(source, encoder.max_length)
    try:
        results = text_encoder_parity(reference, encoder.path, encoder.tokenizer_path)
    except TextEncoderExportError as err:
        why = str(err).removesuffix("; nothing was written")
        raise TextPathError(f"{encoder.path}: {why}; the file was changed after export: "
                            "restore it or export the bundle again") from None
    worst = max(r.max_abs_error for r in results)
    return (f"text encoder: {len(results)} prompts against {source}, worst error "
            f"{worst:.2e}: passed")


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
