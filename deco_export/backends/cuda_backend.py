"""PyTorch CUDA fast backend: bf16 weights, torch.compile, and one CUDA graph per sampler step.

The fastest NVIDIA path that needs nothing beyond PyTorch, and the baseline TensorRT must beat.
At batch 1 a DeCo-XL step is launch-bound (about 2 x 245 GFLOPs spread over hundreds of small
kernels), so what matters is removing the host from the loop:

* **bf16 (or fp16) weights.** A copy of the model is cast once; RMSNorm statistics, RoPE and
  the timestep frequency features still compute in fp32 inside the model, and the state x,
  the guidance arithmetic and the Euler update stay fp32.
* **torch.compile** (``mode="max-autotune-no-cudagraphs"`` by default) fuses the adaLN
  modulate/gate chains, the patch reshapes and the decoder's per-pixel MLPs, and leaves CUDA
  graphs to this backend so that one graph covers a whole step.
* **Whole-step CUDA graphs** (`step`, the sampler's fused-step capability): per (batch, height,
  width) bucket, static buffers hold x, the labels and a (t, dt, w) record; one graph runs
  [x; x] -> DiT -> decoder -> guidance -> ``x += dt * v`` in place. A step is then one 12-byte
  device copy plus ``graph.replay()``; the state never leaves its buffer and the host never
  waits. Guided and unguided steps of a bucket share the state buffer, so the switch at the
  guidance interval costs nothing.

Works on torch >= 2.11 (``torch.compile`` modes, ``torch.cuda.graph`` with a shared pool). The
plain `deco_export.backends.torch_backend.TorchBackend` remains the CPU/reference path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model import DeCo

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILE_MODES = ("max-autotune-no-cudagraphs", "default", "max-autotune", "reduce-overhead")
_PARAM_CACHE = 4096


def dit_forward(model: DeCo, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, hidden) from class labels, or from a text-to-image model's text tokens (the
    output of ``embed_text``, computed once per generation); ``guidance`` the scale w of a
    guidance-distilled model."""
    if model.config.is_text_to_image:
        return model.dit.forward_embedded(x_t, t, y.to(x_t.dtype), guidance)
    return model.dit(x_t, t, y, guidance)


def guided_step(model: DeCo, dtype: torch.dtype, x: torch.Tensor, y2: torch.Tensor,
                params: torch.Tensor) -> torch.Tensor:
    """x + dt (v_u + w (v_c - v_u)) from one [x; x] batch; params = (t, dt, w) on the device.
    The same operations, in the same order, as the sampler's guidance and Euler update."""
    b = x.shape[0]
    x2 = torch.cat([x, x]).to(dtype)
    cond, _ = dit_forward(model, x2, params[0].expand(2 * b), y2)
    v = model.decoder(x2, cond).float()
    v_u, v_c = v[:b], v[b:]
    return x + (v_u + (v_c - v_u) * params[2]) * params[1]


def unguided_step(model: DeCo, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor,
                  params: torch.Tensor) -> torch.Tensor:
    """x + dt v for the conditional batch alone."""
    xd = x.to(dtype)
    cond, _ = dit_forward(model, xd, params[0].expand(x.shape[0]), y)
    return x + model.decoder(xd, cond).float() * params[1]


@dataclass
class _Bucket:
    """Static buffers of one (batch, height, width) bucket and its captured step graphs."""

    x: torch.Tensor
    y: torch.Tensor  # (B,) labels (or (B, L, D) text tokens) for unguided steps
    y2: torch.Tensor  # (2B,) [null; labels] (or [negative; prompts] tokens) for guided steps
    params: torch.Tensor  # (3,) t, dt, w
    bound: dict[bool, Any] = field(default_factory=dict)  # guided -> label array last copied
    runners: dict[bool, Callable[[], Any]] = field(default_factory=dict)


class CudaGraphBackend:
    """Implements the ``runtimes.Backend`` protocol (plus ``step``) on a CUDA GPU.

    model: a `DeCo` (copied and cast; the caller's model is untouched). precision: "bf16"
    (default), "fp16" or "fp32". compile: wrap the step and the two graphs in torch.compile.
    compile_mode: a torch.compile mode; "reduce-overhead" lets Inductor own the CUDA graphs
    instead of this backend. cuda_graphs: capture one graph per step bucket. warmup: eager
    iterations before a capture (compilation and autotuning happen there). allow_cpu: accept a
    CPU device and run the same bookkeeping without graphs (for tests; no speed-up).
    """

    name = "torch-cuda"
    supports_refresh = True
    supports_step = True
    supports_decoder_split = True
    takes_guidance = False  # True for a guidance-distilled model

    def __init__(self, model: DeCo, device: str | torch.device = "cuda", precision: str = "bf16",
                 compile: bool = True, compile_mode: str = "max-autotune-no-cudagraphs",
                 cuda_graphs: bool = True, warmup: int = 2, allow_cpu: bool = False):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, not {precision!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, not {compile_mode!r}")
        device = torch.device(device)
        on_gpu = device.type == "cuda" and torch.cuda.is_available()
        if not on_gpu and not (allow_cpu and device.type == "cpu"):
            raise ValueError(
                "the torch-cuda backend needs an NVIDIA GPU that torch can see (torch "
                f"{torch.__version__}, cuda available: {torch.cuda.is_available()}); use the "
                "torch backend (TorchBackend) on the CPU"
            )
        if on_gpu and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.on_gpu = on_gpu  # allow_cpu runs the same bookkeeping without graphs (tests)
        self.device = device
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.config = model.config
        self.model = copy.deepcopy(model).to(device=device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.compile_mode = compile_mode if compile else None
        # Inductor's own CUDA graphs ("reduce-overhead") cannot nest inside ours.
        self.cuda_graphs = on_gpu and bool(cuda_graphs) and compile_mode != "reduce-overhead"
        self.warmup = max(1, int(warmup))
        if compile:
            _raise_recompile_limit(64)  # one compiled variant per bucket and guidance mode
        self.supports_text_embedding = model.config.is_text_to_image
        # A guidance-distilled model's DiT takes w; its fused step (a [x; x] batch) does not
        # apply, so the sampler drives it through dit and decoder.
        self.takes_guidance = model.config.guidance_distilled
        self.supports_step = not self.takes_guidance
        self._dit = self._compiled(self._dit_forward)
        self._embed_text = self._compiled(self.model.dit.embed_text) if (
            self.supports_text_embedding) else None
        self._decoder = self._compiled(self.model.decoder)
        self._decoder_cond = self._compiled(self.model.decoder.modulation)
        self._decoder_pixel = self._compiled(self.model.decoder.pixels)
        self._steps = {True: self._compiled(self._guided_step),
                       False: self._compiled(self._unguided_step)}
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self._params: dict[tuple[float, float, float], torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._last_out: torch.Tensor | None = None

    def _compiled(self, fn: Any) -> Any:
        if self.compile_mode is None:
            return fn
        return torch.compile(fn, mode=self.compile_mode, fullgraph=True, dynamic=False)

    # -- the step, as the graph sees it -----------------------------------------------------------

    def _dit_forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dit_forward(self.model, x_t, t, y, guidance)

    def _guided_step(self, x: torch.Tensor, y2: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return guided_step(self.model, self.dtype, x, y2, params)

    def _unguided_step(self, x: torch.Tensor, y: torch.Tensor,
                       params: torch.Tensor) -> torch.Tensor:
        return unguided_step(self.model, self.dtype, x, y, params)

    # -- the fused whole-step capability --------------------------------------------------------

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, t: float, dt: float,
             guidance: float | None) -> torch.Tensor:
        """One Euler step ``x + dt * v`` as one CUDA graph replay (see the module docstring).

        guidance None: unguided, ``y`` holds the B labels; a float w: guided, ``y`` holds the
        2B labels [null; labels]. The result is the bucket's state buffer, valid until the next
        call; passing it back costs no copy.
        """
        b, _, h, w = x.shape
        guided = guidance is not None
        bucket = self._bucket(b, h, w)
        if x is not self._last_out:
            bucket.x.copy_(x)
        labels = bucket.y2 if guided else bucket.y
        if bucket.bound.get(guided) is not y:
            labels.copy_(y)
            bucket.bound[guided] = y  # holding the reference keeps the identity test sound
        bucket.params.copy_(self._param_record(t, dt, guidance if guided else 1.0))
        run = bucket.runners.get(guided)
        if run is None:
            run = self._prepare(bucket, guided)
        run()
        self._last_out = bucket.x
        return bucket.x

    def _bucket(self, b: int, h: int, w: int) -> _Bucket:
        key = (b, h, w)
        bucket = self._buckets.get(key)
        if bucket is None:
            c = self.config.in_channels
            dev = self.device
            if self.supports_text_embedding:  # text tokens (B, L, D), float32 as embed_text's
                row: tuple[int, ...] = (self.config.text_len, self.config.hidden_size)
                y, y2 = (torch.zeros(n, *row, device=dev) for n in (b, 2 * b))
            else:
                null = self.config.null_class
                y, y2 = (torch.full((n,), null, dtype=torch.int64, device=dev)
                         for n in (b, 2 * b))
            bucket = _Bucket(x=torch.zeros(b, c, h, w, device=dev), y=y, y2=y2,
                             params=torch.zeros(3, device=dev))
            self._buckets[key] = bucket
        return bucket

    def _param_record(self, t: float, dt: float, w: float) -> torch.Tensor:
        """A device (t, dt, w) record, uploaded once per distinct step from pinned memory and
        reused by every run on the same time grid."""
        key = (float(t), float(dt), float(w))
        record = self._params.get(key)
        if record is None:
            if len(self._params) >= _PARAM_CACHE:
                self._params.clear()
            host = torch.tensor(key, dtype=torch.float32)
            record = host.pin_memory().to(self.device, non_blocking=True) if self.on_gpu else host
            self._params[key] = record
        return record

    def _prepare(self, bucket: _Bucket, guided: bool) -> Callable[[], Any]:
        """Warm up (compile, autotune) out of place, then capture the in-place step."""
        fn = self._steps[guided]
        labels = bucket.y2 if guided else bucket.y

        def eager() -> None:
            if self.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            bucket.x.copy_(fn(bucket.x, labels, bucket.params))

        if not self.cuda_graphs:
            bucket.runners[guided] = eager
            return eager
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(bucket.x, labels, bucket.params)  # leaves the state untouched
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bucket.x.copy_(fn(bucket.x, labels, bucket.params))
        bucket.runners[guided] = graph.replay
        return graph.replay

    # -- Backend protocol ----------------------------------------------------------------------

    @torch.no_grad()
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """A text-to-image model's text tokens (B, L, D) float32, once per generation."""
        if self._embed_text is None:
            raise ValueError("embed_text is for text-to-image models")
        return self._embed_text(text).float()

    @torch.no_grad()
    def dit(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
            guidance: torch.Tensor | None = None) -> torch.Tensor:
        self._last_out = None
        cond, _ = self._dit(x_t.to(self.dtype), t, y, guidance)
        return cond.float()

    @torch.no_grad()
    def dit_hidden(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   guidance: torch.Tensor | None = None) -> torch.Tensor:
        self._last_out = None
        _, hidden = self._dit(x_t.to(self.dtype), t, y, guidance)
        return hidden.float()

    @torch.no_grad()
    def refresh_condition(self, hidden: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model.dit.refresh_condition(hidden.to(self.dtype), t).float()

    @torch.no_grad()
    def decoder(self, x_t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self._last_out = None
        return self._decoder(x_t.to(self.dtype), cond.to(self.dtype)).float()

    @torch.no_grad()
    def decoder_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """The modulation, float32 as every graph output (a cached modulation crosses steps)."""
        self._last_out = None
        return self._decoder_cond(cond.to(self.dtype)).float()

    @torch.no_grad()
    def decoder_pixel(self, x_t: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        self._last_out = None
        return self._decoder_pixel(x_t.to(self.dtype), modulation.to(self.dtype)).float()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        array = array.detach()
        if array.is_floating_point():
            array = array.float()
        return array.cpu().numpy()

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays), dim=0)

    def synchronize(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        """What runs where: for logs and benchmark reports."""
        return {
            "backend": self.name,
            "device": torch.cuda.get_device_name(self.device) if self.on_gpu else "cpu",
            "precision": self.precision,
            "compile_mode": self.compile_mode,
            "cuda_graphs": self.cuda_graphs,
            "buckets": sorted(self._buckets),
            "torch": torch.__version__,
        }

    def close(self) -> None:
        """Drop graphs and buffers (their memory returns to torch's caching allocator)."""
        self.synchronize()
        self._buckets.clear()
        self._params.clear()
        self._last_out = None


def _raise_recompile_limit(limit: int) -> None:
    """Dynamo caches a few variants per function by default; buckets need one each."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def from_bundle(bundle_dir: str | Path | None, manifest: Any, *, precision: str = "bf16",
                device: str | torch.device = "cuda", checkpoint: str | None = None,
                model: DeCo | None = None, **options: Any) -> CudaGraphBackend:
    """The runtimes registry's factory for "torch-cuda" (see ``torch_backend.from_bundle``);
    ``options`` are `CudaGraphBackend`'s (compile, compile_mode, cuda_graphs, warmup)."""
    if model is None:
        from ..sources import bundle_source_model

        model = bundle_source_model(bundle_dir or ".", manifest, checkpoint)
    return CudaGraphBackend(model, device=device, precision=precision, **options)
