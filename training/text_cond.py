"""Text conditioning for training: every caption's embedding in memory, picked per step.

At start the trainer encodes each distinct caption of the training split once (through the
on-disk :class:`~training.text_cache.TextEmbeddingCache`) into one (N, L, C) table whose row 0
is the empty prompt. A step then only gathers rows: one caption per image, chosen uniformly
among the image's captions, replaced by the empty prompt with the CFG dropout rate (the
reference's 10 %: it trains the unconditional branch that guidance subtracts). Both choices
come from uniform numbers the trainer draws from the step generator for the whole global
batch, so they do not depend on sharding or resumption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .captions import caption_table, pick_captions
from .text_cache import TextEmbeddingCache

__all__ = ["TextConditioning", "load_text_encoder"]


def load_text_encoder(name: str, max_length: int) -> Any:
    """``minilm`` (all-MiniLM-L6-v2 from its wheel) or a local Qwen3 directory."""
    from deco_export.text_encoders import minilm_encoder, qwen3_encoder

    if name in ("minilm", "all-MiniLM-L6-v2"):
        return minilm_encoder(max_length)
    if not Path(name).is_dir():
        raise FileNotFoundError(
            f"text encoder '{name}' is neither 'minilm' nor a local Qwen3 directory"
        )
    return qwen3_encoder(name, max_length)


class TextConditioning:
    """The caption table of a dataset and its embeddings (see the module docstring)."""

    def __init__(
        self,
        captions: Sequence[Sequence[str]],
        encoder: Any,
        cache_root: str | Path,
        *,
        text_len: int,
        text_dim: int,
        progress: bool = False,
    ) -> None:
        got = (int(encoder.max_length), int(encoder.dim))
        if got != (text_len, text_dim):
            raise ValueError(
                f"the text encoder gives {got[0]} tokens x {got[1]} features but the model "
                f"takes {text_len} x {text_dim}; choose a preset (or text_len/text_dim) that "
                "matches the encoder"
            )
        self.unique, self.flat, self.offsets, self.counts = caption_table(captions)
        self.cache = TextEmbeddingCache(cache_root, encoder)
        self.identity = self.cache.identity
        self.encoder = encoder
        self.table = torch.from_numpy(self.cache.get(self.unique, progress=progress))

    @property
    def empty(self) -> torch.Tensor:
        """(L, C) embedding of the empty prompt (row 0)."""
        return self.table[0]

    def pick(
        self, items: torch.Tensor, caption_coins: torch.Tensor, drop_coins: torch.Tensor,
        dropout: float,
    ) -> torch.Tensor:
        """(B, L, C) embeddings: one caption per item, the empty prompt where coin < dropout."""
        items, caption_coins, drop_coins = (x.cpu() for x in (items, caption_coins, drop_coins))
        ids = pick_captions(items, caption_coins, self.flat, self.offsets, self.counts)
        ids = torch.where(drop_coins < dropout, torch.zeros_like(ids), ids)
        return self.table[ids]

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, C) embeddings of arbitrary prompts (through the cache)."""
        return torch.from_numpy(self.cache.get(list(prompts)))

    def first_captions(self, n: int) -> list[str]:
        """``n`` prompts spread over the dataset: the first caption of evenly spaced items."""
        items = np.linspace(0, len(self.offsets) - 1, n).round().astype(int)
        return [self.unique[int(self.flat[self.offsets[i]])] for i in items]
