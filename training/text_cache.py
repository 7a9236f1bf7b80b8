"""Text embeddings of captions, computed once per (encoder, caption) and kept on disk.

The text encoder is frozen, so a caption's embedding never changes: encoding the ~7,000
emoji captions with all-MiniLM-L6-v2 costs about as much CPU time as hundreds of training
steps, and re-encoding them each step would cost more than the DiT. The cache holds one
``.npy`` (L, C) float32 per caption under

    <cache>/text/<encoder id>/<sha256(caption)[:2]>/<sha256(caption)>.npy

The encoder id is a hash of everything that changes the features: the encoder's files (model
and tokenizer), its sequence length, compute dtype and attention implementation. A different
encoder, length or weight file gets a different directory, so a stale entry is never read.

Writes go through :func:`runtimes.fileio.atomic_open` (temporary file, fsync, rename) under
the cache's write lock (`runtimes.locks.lock`): concurrent runs (DDP ranks, two trainings on
one machine) never see a partial file, and the second one to take the lock finds the first
one's entries and encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.fileio import atomic_open, sha256_path
from runtimes.locks import lock

__all__ = ["TextEmbeddingCache", "encoder_identity"]


def encoder_identity(encoder: Any) -> str:
    """A stable id of what a text encoder computes (see the module docstring).

    An encoder may state its own with an ``identity`` attribute (string); a transformers
    encoder is identified by the sha256 of its directory's files plus its settings.
    """
    explicit = getattr(encoder, "identity", None)
    if isinstance(explicit, str) and explicit:
        return hashlib.sha256(explicit.encode()).hexdigest()[:32]
    directory = getattr(encoder, "directory", None)
    if directory is None:
        raise ValueError(
            f"cannot identify text encoder {type(encoder).__name__}: give it an 'identity' "
            "string or a 'directory' of model files"
        )
    from deco_export.text_encoders import ATTENTION

    model = getattr(encoder, "model", None)
    dtype = str(next(model.parameters()).dtype) if model is not None else ""
    desc = {
        "files": sha256_path(directory),
        "max_length": int(encoder.max_length),
        "dim": int(encoder.dim),
        "dtype": dtype,
        "attention": ATTENTION,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


class TextEmbeddingCache:
    """Embeddings of captions for one encoder, on disk under ``root/text/<encoder id>``."""

    def __init__(self, root: str | Path, encoder: Any, batch_size: int = 256) -> None:
        self.encoder = encoder
        self.identity = encoder_identity(encoder)
        self.dir = Path(root) / "text" / self.identity
        self.batch_size = batch_size
        self.hits = 0
        self.misses = 0

    def path(self, caption: str) -> Path:
        key = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.dir / key[:2] / f"{key}.npy"

    def _read(self, caption: str) -> np.ndarray | None:
        p = self.path(caption)
        if not p.is_file():
            return None
        arr = np.load(p)
        expected = (self.encoder.max_length, self.encoder.dim)
        return arr if arr.shape == expected and arr.dtype == np.float32 else None

    def get(self, captions: Sequence[str], progress: bool = False) -> np.ndarray:
        """(N, L, C) float32 embeddings of ``captions``; encodes and stores the missing ones."""
        out: list[np.ndarray | None] = [self._read(c) for c in captions]
        missing = [i for i, a in enumerate(out) if a is None]
        if missing:
            self.dir.mkdir(parents=True, exist_ok=True)
            with lock(self.dir):
                # Another process may have written them while this one waited for the lock.
                for i in missing:
                    out[i] = self._read(captions[i])
                missing = [i for i, a in enumerate(out) if a is None]
                self._encode(captions, missing, out, progress)
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        return np.stack(out) if out else np.zeros((0, self.encoder.max_length, self.encoder.dim),
                                                  np.float32)

    def _encode(self, captions: Sequence[str], missing: list[int],
                out: list[np.ndarray | None], progress: bool) -> None:
        unique = list(dict.fromkeys(captions[i] for i in missing))
        done: dict[str, np.ndarray] = {}
        from tqdm import tqdm

        bar = tqdm(total=len(unique), disable=not progress or not unique, unit="caption",
                   desc="text embeddings")
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start : start + self.batch_size]
            feats = np.asarray(self.encoder.encode(chunk), dtype=np.float32)
            for caption, f in zip(chunk, feats, strict=True):
                p = self.path(caption)
                p.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(p, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(f))
                # What the next run reads back, so a cold and a warm cache train identically.
                done[caption] = np.load(p)
            bar.update(len(chunk))
        bar.close()
        for i in missing:
            out[i] = done[captions[i]]
