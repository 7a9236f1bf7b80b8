"""A bundle's text encoder in ONNX Runtime: ``tokenizer.json`` (the ``tokenizers`` package)
and ``text_encoder.onnx``, so prompts become DiT inputs without torch or transformers.

The tokenizer file carries the encoder's padding (right, to exactly L tokens) and truncation,
so ``encode(prompts)`` gives the (B, L, C) float32 features the PyTorch encoder gives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.backend import BackendError
from runtimes.bundle import BundleError, Manifest, read_manifest

__all__ = ["OnnxTextEncoder", "bundle_text_encoder"]


class OnnxTextEncoder:
    """``encode(prompts) -> (B, L, C)`` float32 from a bundle's ``text_encoder`` artifact.

    The session is created on the first call, so opening a bundle stays cheap for callers who
    pass their own embeddings.
    """

    def __init__(self, bundle_dir: str | os.PathLike[str], manifest: Manifest | None = None,
                 providers: str | Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None, precision: str = "fp32") -> None:
        self.bundle_dir = Path(bundle_dir)
        manifest = manifest if manifest is not None else read_manifest(self.bundle_dir)
        art = manifest.find_artifact("onnx", "text_encoder", precision)
        self.path = self.bundle_dir / art.file
        tokenizer = art.details.get("tokenizer", "tokenizer.json")
        self.tokenizer_path = self.bundle_dir / tokenizer
        for path in (self.path, self.tokenizer_path):
            if not path.is_file():
                raise BundleError(f"{path}: missing; restore it or export the bundle again")
        out = art.outputs[0]
        self.max_length = int(out.shape[1])
        self.dim = int(out.shape[2])
        from runtimes.backends.onnxruntime import resolve_providers

        # Short names ("cuda", "cpu") as for the backend; a provider ONNX Runtime drops is an
        # error when the session is made, never a silent fallback.
        self.providers = [name for name, _ in resolve_providers(providers)]
        self.intra_op_threads = intra_op_threads
        self._session: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BackendError(
                f"encoding prompts with the bundle's text encoder needs onnxruntime and "
                f"tokenizers ({exc}); pip install onnxruntime tokenizers"
            ) from None
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.intra_op_threads:
            options.intra_op_num_threads = int(self.intra_op_threads)
        self._session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        got = self._session.get_providers()
        if missing := [p for p in self.providers if p not in got]:
            self._session = None
            raise BackendError(
                f"{self.path}: asked for {', '.join(missing)} but ONNX Runtime fell back to "
                f"{', '.join(got)}; install onnxruntime-gpu (alone) for CUDA, or pass "
                "text_encoder_providers='cpu'"
            )

    def unload(self) -> None:
        """Free the session and the tokenizer (the encoder's weights: 7 GB for the released
        Qwen3-1.7B in fp32); the next ``encode`` loads them again."""
        self._session = None
        self._tokenizer = None

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) (B, L) int64, right-padded to L."""
        if self._tokenizer is None:
            self._load()
        encodings = self._tokenizer.encode_batch(list(prompts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        if ids.shape[1:] != (self.max_length,):
            raise BundleError(
                f"{self.tokenizer_path}: gives {ids.shape[1]} tokens, the text encoder takes "
                f"{self.max_length}; export the bundle again"
            )
        return ids, mask

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(prompts)
        hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return np.asarray(hidden, dtype=np.float32)


def bundle_text_encoder(bundle_dir: str | os.PathLike[str], manifest: Manifest,
                        **options: Any) -> OnnxTextEncoder | None:
    """The bundle's text encoder, or None when it has none (``options``: `OnnxTextEncoder`'s
    ``providers``, ``intra_op_threads``, ``precision``)."""
    if not any(a.runtime == "onnx" and a.graph == "text_encoder" for a in manifest.artifacts):
        return None
    return OnnxTextEncoder(bundle_dir, manifest, **options)
