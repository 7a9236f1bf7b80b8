"""A bundle's text encoder in ONNX Runtime: ``tokenizer.json`` (the ``tokenizers`` package)
and ``text_encoder.onnx``, so prompts become DiT inputs without torch or transformers.

The tokenizer file carries the encoder's padding (right, to exactly L tokens) and truncation,
so ``encode(prompts)`` gives the (B, L, C) float32 features the PyTorch encoder gives.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.backend import BackendError
from runtimes.bundle import BundleError, Manifest, path_size, read_manifest, sha256_path

__all__ = ["OnnxTextEncoder", "bundle_text_encoder"]


class OnnxTextEncoder:
    """``encode(prompts) -> (B, L, C)`` float32 from a bundle's ``text_encoder`` artifact.

    The session is created on the first call, so opening a bundle stays cheap for callers who
    pass their own embeddings. That first call happens long after `runtimes.load` verified the
    bundle, so it checks the two files against the manifest again (size, then sha256) before
    reading them, and holds a lock: threads that make the first call together open the session
    once, and every one of them sees it complete.
    """

    def __init__(self, bundle_dir: str | os.PathLike[str], manifest: Manifest | None = None,
                 providers: str | Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None, precision: str = "fp32",
                 verify: bool = True) -> None:
        self.bundle_dir = Path(bundle_dir)
        manifest = manifest if manifest is not None else read_manifest(self.bundle_dir)
        art = manifest.get_artifact("onnx", "text_encoder", precision)
        if art is None:
            have = [a.precision for a in manifest.artifacts
                    if (a.runtime, a.graph) == ("onnx", "text_encoder")]
            raise BundleError(
                f"this bundle has no onnx text_encoder graph at {precision} (its text encoder "
                f"has: {', '.join(have) or 'none'}); pass text_encoder_precision="
                f"{have[0] if have else 'fp32'!r} or export it with `deco export onnx ... "
                f"--text-encoder-precision {precision}`")
        self.path = self.bundle_dir / art.file
        tokenizer = art.details.get("tokenizer", "tokenizer.json")
        self.tokenizer_path = self.bundle_dir / tokenizer
        # (path, size or None, sha256) of every file the session and the tokenizer read.
        self._expected = [(self.path, art.bytes, art.sha256)] + [
            (self.bundle_dir / rel, art.extra_bytes.get(rel), sha)
            for rel, sha in art.extra_files.items()]
        self.verify = verify
        self._lock = threading.Lock()
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

    def _check_files(self) -> None:
        for path, size, _ in self._expected:
            if size is not None and path_size(path) != size:
                raise BundleError(
                    f"{path}: {path_size(path)} bytes, the manifest says {size}: the file "
                    "changed after the bundle was opened; restore it or export the bundle again"
                )
        for path, _, sha in self._expected:
            if sha256_path(path) != sha:
                raise BundleError(
                    f"{path}: sha256 does not match the manifest: the file changed after the "
                    "bundle was opened; restore it or export the bundle again"
                )

    def _ensure_loaded(self) -> None:
        if self._session is not None:
            return
        with self._lock:
            if self._session is None:
                self._load()

    def _load(self) -> None:
        if self.verify:
            self._check_files()
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BackendError(
                f"encoding prompts with the bundle's text encoder needs onnxruntime and "
                f"tokenizers ({exc}); pip install onnxruntime tokenizers"
            ) from None
        try:
            tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as exc:  # the tokenizers package raises a bare Exception
            raise BundleError(f"{self.tokenizer_path}: not a tokenizer file ({_first_line(exc)}); "
                              "restore it or export the bundle again") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.intra_op_threads:
            options.intra_op_num_threads = int(self.intra_op_threads)
        try:
            session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime's own exception types
            raise BundleError(f"{self.path}: ONNX Runtime cannot open it ({_first_line(exc)}); "
                              "restore it or export the bundle again") from None
        got = session.get_providers()
        if missing := [p for p in self.providers if p not in got]:
            raise BackendError(
                f"{self.path}: asked for {', '.join(missing)} but ONNX Runtime fell back to "
                f"{', '.join(got)}; install onnxruntime-gpu (alone) for CUDA, or pass "
                "text_encoder_providers='cpu'"
            )
        self._tokenizer = tokenizer
        self._session = session  # last: it is what other threads test

    def unload(self) -> None:
        """Free the session and the tokenizer (the encoder's weights: 7 GB for the released
        Qwen3-1.7B in fp32); the next ``encode`` loads them again (checking the files)."""
        with self._lock:
            self._session = None
            self._tokenizer = None

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) (B, L) int64, right-padded to L."""
        self._ensure_loaded()
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
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompt to encode: give at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} is {type(prompt).__name__}, not a string")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:  # a byte the terminal's locale could not decode
                raise ValueError(
                    f"prompt {i} holds a character that is not valid text "
                    f"({exc.object[exc.start]!r} at {exc.start}); write the prompt in UTF-8"
                ) from None
        ids, mask = self.tokenize(prompts)  # opens the session on the first call
        hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return np.asarray(hidden, dtype=np.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split())[:200] if text else type(exc).__name__


def bundle_text_encoder(bundle_dir: str | os.PathLike[str], manifest: Manifest,
                        **options: Any) -> OnnxTextEncoder | None:
    """The bundle's text encoder, or None when it has none (``options``: `OnnxTextEncoder`'s
    ``providers``, ``intra_op_threads``, ``precision``)."""
    if not any(a.runtime == "onnx" and a.graph == "text_encoder" for a in manifest.artifacts):
        return None
    return OnnxTextEncoder(bundle_dir, manifest, **options)
