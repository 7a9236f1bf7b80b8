"""PyTorch backend for the runtime sampler: the DiT and the decoder as two eager (or compiled)
calls on torch tensors that stay on the model's device between steps.

Precision follows the reference: fp32 master weights, and for ``bf16``/``fp16`` the forward
runs under ``torch.autocast`` (RMSNorm and RoPE compute in fp32 inside the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model import DeCo, PixelDiT

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


class TorchBackend:
    """Implements the ``runtimes.Backend`` protocol on a :class:`DeCo` module, or its
    one-graph ``velocity`` capability on a :class:`PixelDiT` (the plain DiT baseline)."""

    name = "torch"
    supports_refresh = True
    supports_velocity = False
    thread_safe = True  # eager modules under no_grad share no state between calls
    supports_decoder_split = True
    supports_text_embedding = False  # True for a text-to-image model
    takes_guidance = False  # True for a guidance-distilled model

    def __init__(self, model: DeCo | PixelDiT, device: str | torch.device | None = "cpu",
                 precision: str = "fp32", compile: bool = False):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}, not {precision!r}")
        self.device = resolve_device(device)
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.config = model.config
        if isinstance(model, PixelDiT):
            self.supports_refresh, self.supports_velocity = False, True
            self.supports_decoder_split = False
            self._velocity = torch.compile(self.model) if compile else self.model
            return
        # A text-to-image DiT embeds the text once per generation (embed_text); its steps
        # start from the text tokens.
        self.supports_text_embedding = self.config.is_text_to_image
        self.takes_guidance = self.config.guidance_distilled
        self._dit = self.model.dit.forward_embedded if self.supports_text_embedding else (
            self.model.dit)
        self._embed_text = self.model.dit.embed_text if self.supports_text_embedding else None
        self._decoder = self.model.decoder
        self._decoder_cond = self.model.decoder.modulation
        self._decoder_pixel = self.model.decoder.pixels
        if compile:
            self._dit = torch.compile(self._dit)
            if self._embed_text is not None:
                self._embed_text = torch.compile(self._embed_text)
            self._decoder = torch.compile(self._decoder)
            self._decoder_cond = torch.compile(self._decoder_cond)
            self._decoder_pixel = torch.compile(self._decoder_pixel)

    @torch.inference_mode()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """v of the one-graph plain DiT (only when ``supports_velocity``)."""
        with self._autocast():
            v = self._velocity(x_t, t, y)
        return v.float()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> TorchBackend:
        from ..checkpoint import load_any

        return cls(load_any(path), **kwargs)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text features (B, L, C) to the DiT's text tokens (B, L, D), float32."""
        if self._embed_text is None:
            raise ValueError("embed_text is for text-to-image models")
        with self._autocast():
            tokens = self._embed_text(text)
        return tokens.float()

    @torch.inference_mode()
    def dit(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
            guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The condition; ``guidance`` is the scale w of a guidance-distilled model."""
        with self._autocast():
            cond, _ = self._dit(x_t, t, y, guidance)
        return cond.float()

    @torch.inference_mode()
    def dit_hidden(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   guidance: torch.Tensor | None = None) -> torch.Tensor:
        with self._autocast():
            _, hidden = self._dit(x_t, t, y, guidance)
        return hidden.float()

    @torch.inference_mode()
    def refresh_condition(self, hidden: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            cond = self.model.dit.refresh_condition(hidden, t)
        return cond.float()

    @torch.inference_mode()
    def decoder(self, x_t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            v = self._decoder(x_t, cond)
        return v.float()

    @torch.inference_mode()
    def decoder_cond(self, cond: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            modulation = self._decoder_cond(cond)
        return modulation.float()

    @torch.inference_mode()
    def decoder_pixel(self, x_t: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            v = self._decoder_pixel(x_t, modulation)
        return v.float()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().cpu().numpy()

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays), dim=0)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        pass


def from_bundle(bundle_dir: str | Path | None, manifest: Any, *, precision: str = "fp32",
                device: str | torch.device | None = "cpu", compile: bool = False,
                checkpoint: str | None = None, model: DeCo | PixelDiT | None = None
                ) -> TorchBackend:
    """The runtimes registry's factory for "torch": the checkpoint a bundle was exported from
    (its manifest names it; ``checkpoint`` overrides the path), or ``model`` when the caller
    has loaded it already (then ``bundle_dir`` and ``manifest`` may be None)."""
    if model is None:
        from ..sources import bundle_source_model

        model = bundle_source_model(bundle_dir or ".", manifest, checkpoint)
    return TorchBackend(model, device=device, precision=precision, compile=compile)
