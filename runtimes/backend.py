"""The seam between the sampler and a runtime: the `Backend` protocol.

DeCo splits one denoiser call into two graphs, and a backend answers exactly those two calls on
arrays of its own kind ("native" arrays: numpy for CPU runtimes, device buffers where a runtime
keeps tensors on a GPU):

- ``dit(x_t, t, y) -> cond``: the expensive, low-frequency half. ``x_t`` is (B, C, H, W)
  float32, ``t`` is (B,) float32 in [0, 1] with **t = 0 pure noise and t = 1 data**, ``y`` is
  (B,) int64 class labels where the null (unconditional) class is ``num_classes`` (a
  text-to-image model takes its text there instead, the unconditional rows being the encoded
  empty or negative prompt: the text tokens of ``embed_text``, below, or the text embeddings
  (B, L, C) float32 for a backend without it). It returns
  the per-token condition (B, L, D) with L = (H / p) * (W / p).
- ``decoder(x_t, cond) -> v``: the cheap, full-resolution half; returns the velocity
  (B, C, H, W) float32.

The sampler only ever combines native arrays with ``+``, ``-``, ``*`` (with each other and with
Python floats), slices them along the batch axis (``a[:B]``, ``a[B:]``) and joins float arrays
with ``concat``. It crosses the host boundary through ``from_numpy`` / ``to_numpy`` only before
the first step and after the last, so a backend that keeps arrays on a device pays no per-step
copies.

Optional capability (DiT sharing in "fresh-t" mode): ``dit_hidden(x_t, t, y) -> hidden`` returns
the last DiT block output h (B, L, D), and ``refresh_condition(hidden, t) -> cond`` rebuilds
cond = SiLU(e_t + h) for a new timestep. A backend that offers both sets
``supports_refresh = True``.

Optional capability (the split decoder, for DiT sharing in "reuse" mode):
``decoder_cond(cond) -> modulation`` returns the decoder's per-pixel condition (B, L, p*p, d)
float32 (what its blocks' adaLN reads), which depends on the condition alone, and
``decoder_pixel(x_t, modulation) -> v`` the velocity from it;
``decoder_pixel(x_t, decoder_cond(cond))`` is ``decoder(x_t, cond)``. A backend that offers
both sets ``supports_decoder_split = True``; the sampler then computes the modulation once per
DiT run whose condition later steps reuse, and runs only the pixel part on those steps. The
modulation is opaque to the sampler, which only slices it along the batch.

Text-to-image backends (text embedding): the DiT's text path starts with work that depends on
the prompt alone (y_embedder + position embedding). A backend that runs it as its own call sets
``supports_text_embedding = True`` and offers ``embed_text(text) -> text_tokens``, text features
(B, L, C) float32 to the DiT's text tokens (B, L, D); its ``dit`` and ``dit_hidden`` (and
``step``) then take those tokens as ``y``. The sampler embeds the conditional and unconditional
rows once per generation, so no step repeats the prompt's work. A backend without the capability
takes the text features in ``dit`` itself.

Optional capability (fused steps): a backend that can run a whole Euler step as one unit (for
example one captured CUDA graph: fill t -> DiT -> decoder -> guidance -> update) sets
``supports_step = True`` and offers ``step(x, y, t, dt, guidance) -> x_next``. ``guidance`` is
None for an unguided step (``y`` holds the B labels) or the scale w for a guided one (``y`` holds
the 2B labels [null; labels] and v = v_u + w (v_c - v_u)); ``t`` and ``dt`` are Python floats.
The sampler uses it for plain Euler without DiT sharing; everything else goes through ``dit`` and
``decoder``.

Optional capability (one-graph models): a model without the DiT/decoder split (the plain pixel
DiT baseline, ``architecture="dit"``) runs as one graph. Its backend sets
``supports_velocity = True`` and offers ``velocity(x_t, t, y) -> v`` with the inputs of ``dit``
and the output of ``decoder``; the sampler then calls only that (no DiT sharing: there is no
DiT output to reuse).

Guidance-distilled models: a backend whose model takes the guidance scale as an input (its
DiT record has the ``guidance`` input) sets ``takes_guidance = True``; its ``dit`` and
``dit_hidden`` take a fourth array, the scale w per sample (B,) float32, and give the guided
condition in one conditional pass. The sampler then runs no unconditional half and feeds
w = 1 where the guidance interval leaves a step unguided.

Threads: a backend whose calls may run from several threads at once (ONNX Runtime sessions,
OpenVINO with an infer request per thread, eager PyTorch) sets ``thread_safe = True``. A
`runtimes.DeCoPipeline` on any other backend (one set of device buffers or CUDA graphs, say)
refuses a second concurrent ``generate`` with one line instead of mixing two images' arrays.

This module imports nothing but numpy, so every backend (including the PyTorch
one that lives outside ``runtimes``) can implement the protocol without pulling a runtime in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from runtimes.errors import DecoError

__all__ = [
    "CAPABILITIES",
    "Backend",
    "BackendError",
    "HostArrays",
    "RefreshBackend",
    "close_backend",
    "offers",
    "supports_decoder_split",
    "supports_refresh",
    "supports_step",
    "supports_text_embedding",
    "supports_velocity",
    "takes_guidance",
]


class BackendError(DecoError, RuntimeError):
    """A backend could not be created or run; the message names the cause and the fix."""


@runtime_checkable
class Backend(Protocol):
    """What the sampler needs from a runtime (see the module docstring for shapes and units)."""

    def dit(self, x_t: Any, t: Any, y: Any) -> Any:
        """Per-token condition (B, L, D) for ``x_t`` at times ``t`` with labels ``y``."""

    def decoder(self, x_t: Any, cond: Any) -> Any:
        """Velocity (B, C, H, W) from ``x_t`` and the per-token condition ``cond``."""

    def from_numpy(self, a: np.ndarray) -> Any:
        """Native array holding a copy of (or a view on) ``a``; dtype is kept."""

    def to_numpy(self, a: Any) -> np.ndarray:
        """Host numpy array with the contents of the native array ``a``."""

    def concat(self, arrays: Sequence[Any]) -> Any:
        """Native float arrays joined along the batch axis (axis 0)."""


class HostArrays:
    """The array half of `Backend` for runtimes whose native arrays are host numpy arrays
    (Core ML, OpenVINO): one definition instead of a copy in each backend."""

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def concat(self, arrays: Sequence[Any]) -> np.ndarray:
        return np.concatenate(arrays, axis=0)


@runtime_checkable
class RefreshBackend(Backend, Protocol):
    """A backend that can cache the DiT's h and rebuild the condition for any timestep."""

    supports_refresh: bool

    def dit_hidden(self, x_t: Any, t: Any, y: Any) -> Any:
        """Last DiT block output h (B, L, D), before cond = SiLU(e_t + h)."""

    def refresh_condition(self, hidden: Any, t: Any) -> Any:
        """cond = SiLU(e_t + hidden) for the times ``t`` (B,)."""


# Each optional capability: its flag and the methods it promises. A backend built on the graph
# records (`runtimes.graph_backend.GraphBackend`) sets each flag from the graphs it loaded.
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "supports_refresh": ("dit_hidden", "refresh_condition"),
    "supports_decoder_split": ("decoder_cond", "decoder_pixel"),
    "supports_text_embedding": ("embed_text",),
    "supports_velocity": ("velocity",),
    "supports_step": ("step",),
}


def _supports(backend: Any, flag: str) -> bool:
    return bool(getattr(backend, flag, False)) and all(
        callable(getattr(backend, name, None)) for name in CAPABILITIES[flag])


def offers(backend: Any, method: str) -> bool:
    """Whether ``backend`` answers ``method``: a required call when it is callable, an optional
    one when the capability that promises it is offered."""
    flags = [flag for flag, methods in CAPABILITIES.items() if method in methods]
    if not flags:
        return callable(getattr(backend, method, None))
    return any(_supports(backend, flag) for flag in flags)


def supports_refresh(backend: Any) -> bool:
    """True when ``backend`` offers ``dit_hidden`` and ``refresh_condition`` and says so."""
    return _supports(backend, "supports_refresh")


def supports_decoder_split(backend: Any) -> bool:
    """True when ``backend`` offers ``decoder_cond`` and ``decoder_pixel`` and says so."""
    return _supports(backend, "supports_decoder_split")


def supports_text_embedding(backend: Any) -> bool:
    """True when ``backend`` embeds text once (``embed_text``) and takes text tokens in ``dit``."""
    return _supports(backend, "supports_text_embedding")


def supports_step(backend: Any) -> bool:
    """True when ``backend`` offers a fused whole-step ``step`` and says so."""
    return _supports(backend, "supports_step")


def supports_velocity(backend: Any) -> bool:
    """True when ``backend`` runs a one-graph model through ``velocity`` and says so."""
    return _supports(backend, "supports_velocity")


def takes_guidance(backend: Any) -> bool:
    """True when ``backend``'s model is guidance-distilled: ``dit`` takes the scale w."""
    return bool(getattr(backend, "takes_guidance", False))


def close_backend(backend: Any) -> None:
    """Call ``backend.close()`` when it exists (sessions and device memory are released)."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()
