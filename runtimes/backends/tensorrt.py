"""TensorRT backend: runs a bundle's "dit", "decoder" (and optional "refresh", "decoder_cond"
and "decoder_pixel") engines.

The engines are the ones ``deco export tensorrt BUNDLE`` built for this machine; an engine
built for another TensorRT version or GPU, or from an ONNX graph that has since changed, is
refused with the reason and the fix before it is deserialised (`tensorrt_keys.resolve_engine`).

How it runs (one CUDA stream, no host synchronisation between the first and the last step):

* **Device memory.** Per engine batch and image size (a "slot": the batch sizes the engines
  were built for, see `tensorrt_profiles`, at a size inside the range their profiles span) the I/O
  buffers x_t, t, the condition (``y`` int64 labels, or ``text_tokens`` float32 (B, L, D) for
  a text-to-image model, as the DiT's graph record says, with text_embed's input ``text``;
  a guidance-distilled DiT's ``guidance``), cond, hidden and v (and the split decoder's
  modulation, when its engines exist): every tensor the loaded engines' records declare,
  allocated once, on first use, and every execution context of that batch is bound to them
  (re-bound when the batch runs another size). The DiT writes ``cond`` where the decoder
  reads it, so the two engines hand over without a copy. All contexts are created with
  user-managed device memory and share one activation buffer, sized to the largest profile
  used so far (the engines run one after the other on one stream).
* **Native arrays** are `DeviceArray` objects: float32 / int64 device buffers with the
  sampler's arithmetic (``+``, ``-``, ``* scalar``, batch slices) done by three small kernels
  compiled once with NVRTC. Temporaries come from a caching pool, so a sampling loop does no
  ``cudaMalloc``. Numpy is touched only in ``from_numpy`` / ``to_numpy``.
* **Batches** are padded up to the next engine batch; a guided batch of b images runs as
  [uncond | pad; cond | pad] in the smallest engine batch whose halves hold b rows.
* **Whole-step CUDA graphs** (`step`): for every (engine batch, guided) pair the first call
  runs the DiT and decoder once eagerly (TensorRT sets itself up on the first enqueue), then
  captures fill-t -> DiT -> decoder -> guided Euler update into one CUDA graph, and every step
  after that is one 12-byte device copy of (t, dt, w) plus one ``cudaGraphLaunch``. The state x
  stays in the slot's x_t buffer between steps.

``tensorrt`` and ``cuda-python`` (``cuda.bindings``) are imported when the backend is created,
never by ``import runtimes``.

The CUDA device code lives in `cuda_device`, the engine wrapper in `tensorrt_engine` and the
exporter's numpy runner in `tensorrt_runner`.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.backends.cuda_device import (
    DTYPES,
    INSTALL_HINT,
    CudaDevice,
    DeviceArray,
    import_cuda,
    numel,
)
from runtimes.backends.tensorrt_engine import Engine, cuda_environment, import_tensorrt
from runtimes.backends.tensorrt_keys import ResolvedEngine, resolve_engine
from runtimes.backends.tensorrt_profiles import guided_engine_batch, unguided_engine_batch
from runtimes.backends.tensorrt_runner import EngineRunner
from runtimes.bundle import BundleError, Manifest, read_manifest, sha256_file
from runtimes.graph_backend import GraphBackend
from runtimes.graphs import axis_sizes, dit_condition_input, get_graph, graphs_for

__all__ = [
    "INSTALL_HINT",
    "DeviceArray",
    "EngineRunner",
    "TensorRTBackend",
    "cuda_environment",
    "import_cuda",
    "import_tensorrt",
    "unavailable_reason",
]


def unavailable_reason(precision: str, options: Mapping[str, Any], gpu: bool) -> str | None:
    """The catalogue's probe: why TensorRT cannot run here (library, NVIDIA GPU), or None."""
    from importlib.util import find_spec

    if find_spec("tensorrt") is None:
        return ("No module named 'tensorrt'; TensorRT runs on NVIDIA GPUs: pip install "
                "'deco-export[tensorrt]'")
    if not gpu:
        return "TensorRT needs an NVIDIA GPU and driver"
    return None


@dataclass
class _Slot:
    """The I/O buffers of one engine batch, shared by every engine's context at that batch."""

    batch: int
    buffers: dict[str, DeviceArray]
    shapes: dict[str, tuple[int, ...]]
    size: tuple[int, int] = (0, 0)  # the image (height, width) of its buffers
    bound_y: Any = None  # the condition array (labels or text) last copied into its buffer
    graphs: dict[bool, Any] = field(default_factory=dict)  # guided -> cudaGraphExec_t or False


# ---------------------------------------------------------------------------------------------
# The backend


class TensorRTBackend(GraphBackend):
    """Runs a bundle's TensorRT engines (see the module docstring); the graph calls and
    capabilities follow from the engines loaded (`runtimes.graph_backend`), the fused `step`
    is this backend's own.

    bundle_dir / manifest: the bundle (its manifest is read when None). precision: which
    engine set ("fp16", "bf16", "fp32"). device_id: the GPU. cuda_graphs: capture a whole-step
    CUDA graph per (engine batch, guided) in `step` (default on). rebuild_hint: the command a
    refusal message tells the user to run.
    """

    runtime = "tensorrt"
    supports_step = True

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest | None = None,
        *,
        precision: str = "fp16",
        device_id: int = 0,
        cuda_graphs: bool = True,
        rebuild_hint: str | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.bundle_dir)
        self.precision = precision
        self.cuda_graphs = bool(cuda_graphs)
        trt = import_tensorrt()
        self._cuda: CudaDevice | None = None
        self._engines: dict[str, Engine] = {}
        self._slots: dict[tuple[int, int, int], _Slot] = {}  # (batch, height, width)
        self._size: tuple[int, int] | None = None  # the image size of the last DiT/decoder call
        self._bound: dict[int, tuple[int, int]] = {}  # engine batch -> size its contexts run
        self._memory = (0, 0)
        self._last_out: DeviceArray | None = None
        self._last_key: tuple[int, bool, tuple[int, int]] | None = None
        self.resolved: dict[str, ResolvedEngine] = {}
        try:
            self._cuda = CudaDevice(device_id)
            env = cuda_environment(trt, self._cuda.mods, device_id)
            self.environment = env
            hint = rebuild_hint or (
                f"build engines for this machine with `deco export tensorrt {self.bundle_dir} "
                f"--precision {precision}`")
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            for graph, record in graphs_for(self.manifest.model).items():
                art = self.manifest.get_artifact("tensorrt", graph, precision)
                if art is None:
                    if not record.required:
                        continue
                    try:
                        self.manifest.find_artifact("tensorrt", graph, precision)
                    except BundleError as exc:
                        raise BundleError(f"{exc}; {hint}") from None
                onnx = self.manifest.get_artifact("onnx", graph, precision)
                resolved = resolve_engine(
                    self.bundle_dir, art.details, art.file, art.sha256, env,
                    onnx_sha256=onnx.sha256 if onnx is not None else None, rebuild_hint=hint)
                path = self.bundle_dir / resolved.relpath
                if resolved.relpath != art.file:  # an engine built earlier for this machine
                    if resolved.sha256 is None or sha256_file(path) != resolved.sha256:
                        raise BundleError(f"{path}: sha256 does not match its engine.json; "
                                          f"{hint}")
                self.resolved[graph] = resolved
                self._engines[graph] = Engine(trt, self._runtime, path, graph,
                                              self.manifest.model)
        except BaseException:
            self.close()
            raise
        model = self.manifest.model
        key = self.resolved["dit"].key
        self.image_size = (int(key.image_size[0]), int(key.image_size[1]))
        self.sizes = key.size_range  # what every engine's profiles span
        self.batches = tuple(sorted(set.intersection(
            *(set(e.batches) for e in self._engines.values()))))
        self.null_class = int(model.num_classes)
        self._c = int(model.in_channels)
        self._model = model
        self._d = int(model.hidden_size)
        self.bind_graphs(model, {graph: e.outputs for graph, e in self._engines.items()})

    def bind_graphs(self, model: Any, outputs: Mapping[str, Any]) -> None:
        """The graph calls and capabilities from the engines loaded; the fused `step` runs
        [uncond; cond] CFG and feeds no guidance scale, so a guidance-distilled model samples
        through the graph calls instead (as the sampler does for it anyway)."""
        super().bind_graphs(model, outputs)
        self.supports_step = not self.takes_guidance

    # -- slots and contexts -------------------------------------------------------------------

    @property
    def _condition(self) -> str:
        """The DiT's condition input, from the model's graph record: "y" (int64 labels) or
        "text_tokens" (float32 (B, L, D))."""
        return dit_condition_input(self._model)

    def _slot(self, n: int, size: tuple[int, int] | None = None) -> _Slot:
        """The buffers of engine batch ``n`` at image ``size`` (default: the last size run),
        with every engine's context of that batch bound to them."""
        h, w = size or self._size or self.image_size
        slot = self._slots.get((n, h, w))
        if slot is None:
            slot = self._new_slot(n, h, w)
            self._slots[(n, h, w)] = slot
        if self._bound.get(n) not in (None, (h, w)):
            # The batch's contexts move to another size: graphs captured at the old one would
            # replay the contexts' old shapes, so they are captured again when next used.
            self._drop_graphs(n)
        addresses = {name: buf.ptr for name, buf in slot.buffers.items()}
        for engine in self._engines.values():
            engine.context(n, slot.shapes, addresses, self._memory, self._cuda.stream_handle)
        self._bound[n] = (h, w)
        return slot

    def _drop_graphs(self, n: int) -> None:
        for (batch, *_), slot in self._slots.items():
            if batch == n:
                for g in slot.graphs.values():
                    if g:
                        self._cuda.destroy_graph(g)
                slot.graphs.clear()

    def _new_slot(self, n: int, h: int, w: int) -> _Slot:
        """The buffers of engine batch ``n`` at image ``h`` x ``w``: every input and output
        the loaded engines' graph records declare (the DiT's condition, a guidance-distilled
        DiT's ``guidance``, the split decoder's modulation, text_embed's text), resolved at
        that batch and size, plus the fused step's (t, dt, w) ``params``."""
        cuda = self._cuda
        sizes = axis_sizes(self._model, h, w, n)
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for graph in self._engines:
            spec = get_graph(graph, self._model)
            for tensor in (*spec.inputs, *spec.outputs):
                shapes[tensor.name] = tuple(int(v) for v in tensor.resolve(sizes).shape)
                dtypes[tensor.name] = tensor.dtype
        shapes["params"], dtypes["params"] = (4,), "float32"
        buffers: dict[str, DeviceArray] = {}
        for name, shape in shapes.items():
            nbytes = numel(shape) * DTYPES[dtypes[name]][0]
            ptr = cuda.malloc(nbytes)
            cuda.memset(ptr, nbytes)
            buffers[name] = DeviceArray(cuda, ptr, shape, dtypes[name], "slot")
        condition = self._condition
        if condition == "y":
            # Padding rows must hold a valid label: fill y with the null class once (padding
            # rows of text tokens stay zero, which any DiT accepts).
            nulls = (ctypes.c_int64 * n)(*([self.null_class] * n))
            cuda.copy(buffers["y"].ptr, ctypes.addressof(nulls), 8 * n, "HostToDevice")
            cuda.synchronize()  # `nulls` is pageable host memory: let the copy finish
        need = max(e.memory_size(n) for e in self._engines.values())
        if need > self._memory[1]:
            self._grow_memory(need)
        return _Slot(n, buffers, shapes, (h, w))

    def _grow_memory(self, size: int) -> None:
        """One activation buffer for every context; growing it re-points every context and
        drops the captured graphs (they hold the old address)."""
        cuda = self._cuda
        old = self._memory[0]
        ptr = cuda.malloc(size)
        self._memory = (ptr, size)
        for engine in self._engines.values():
            engine.rebind_memory(self._memory)
        for slot in self._slots.values():
            for g in slot.graphs.values():
                if g:
                    cuda.destroy_graph(g)
            slot.graphs.clear()
        if old:
            cuda.free_owned(old)

    def _check_batch(self, x: DeviceArray) -> None:
        """Refuse an image size outside the engines' profiles (one line naming the range) and
        remember it: the refresh graph, which sees only tokens, runs at the last size."""
        h, w = int(x.shape[2]), int(x.shape[3])
        self.sizes.check(h, w, where="these TensorRT engines run")
        self._size = (h, w)

    def _run(self, graph: str, output: str, feeds: Mapping[str, DeviceArray]) -> DeviceArray:
        """Copy the feeds into the slot of their engine batch, execute, copy ``output`` out
        (a text-to-image DiT's condition input is the text tokens of `embed_text`)."""
        if "x_t" in feeds:
            self._check_batch(feeds["x_t"])
        rows = int(next(iter(feeds.values())).shape[0])
        n = unguided_engine_batch(rows, self.batches)
        slot = self._slot(n)
        for name, arr in feeds.items():
            if tuple(arr.shape[1:]) != tuple(slot.shapes[name][1:]):
                raise ValueError(
                    f"{graph} input {name} has shape {tuple(arr.shape)}, the engines run "
                    f"{slot.shapes[name][1:]} per row at {slot.size[0]}x{slot.size[1]}; run "
                    "the DiT at this size first"
                )
        cuda = self._cuda
        self._last_out = None  # a fused step's state in this slot may be overwritten below
        for name, arr in feeds.items():
            buf = slot.buffers[name]
            if arr.dtype != buf.dtype:
                raise TypeError(f"{graph} input {name} must be {buf.dtype}, got {arr.dtype}")
            cuda.copy(buf.ptr, arr.ptr, arr.nbytes)
        self._engines[graph].execute(n, cuda.stream_handle)
        # The DiT's condition buffer was written (as an input, or as text_embed's output): a
        # fused step must copy its condition in again.
        if self._condition in (*feeds, output):
            slot.bound_y = None
        src = slot.buffers[output]
        out = DeviceArray.empty(cuda, (rows, *src.shape[1:]), "float32")
        cuda.copy(out.ptr, src.ptr, out.nbytes)
        return out

    # -- Backend protocol ---------------------------------------------------------------------

    def from_numpy(self, a: np.ndarray) -> DeviceArray:
        a = np.ascontiguousarray(a)
        dtype = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64"}.get(a.dtype)
        if dtype is None:
            raise TypeError(f"the TensorRT backend holds float32 and int64 arrays, got {a.dtype}")
        out = DeviceArray.empty(self._cuda, a.shape, dtype)
        self._cuda.copy(out.ptr, a.ctypes.data, a.nbytes, "HostToDevice")
        self._cuda.synchronize()  # pageable source: finish before numpy may free it
        return out

    def to_numpy(self, a: DeviceArray) -> np.ndarray:
        out = np.empty(a.shape, dtype=DTYPES[a.dtype][1])
        self._cuda.copy(out.ctypes.data, a.ptr, a.nbytes, "DeviceToHost")
        self._cuda.synchronize()
        return out

    def concat(self, arrays: Sequence[DeviceArray]) -> DeviceArray:
        first = arrays[0]
        if any(a.shape[1:] != first.shape[1:] or a.dtype != first.dtype for a in arrays):
            raise ValueError("concat needs arrays of one dtype and equal trailing shapes")
        out = DeviceArray.empty(self._cuda, (sum(a.shape[0] for a in arrays), *first.shape[1:]),
                                first.dtype)
        offset = 0
        for a in arrays:
            self._cuda.copy(out.ptr + offset, a.ptr, a.nbytes)
            offset += a.nbytes
        return out

    # -- the fused whole-step capability --------------------------------------------------------

    def step(self, x: DeviceArray, y: DeviceArray, t: float, dt: float,
             guidance: float | None) -> DeviceArray:
        """One Euler step ``x + dt * v`` with the DiT, decoder and update as one CUDA graph.

        guidance None: unguided, ``y`` holds the B labels (or text tokens). A float ``w``:
        guided, ``y`` holds the 2B rows [null; labels] (or [negative; prompts]) and
        v = v_u + w (v_c - v_u). The returned array is a view
        of the backend's state buffer, valid until the next call into the backend; passing it
        back to the next ``step`` costs no copy.
        """
        self._check_batch(x)
        b = int(x.shape[0])
        guided = guidance is not None
        n = guided_engine_batch(b, self.batches) if guided else unguided_engine_batch(
            b, self.batches)
        if int(y.shape[0]) != (2 * b if guided else b):
            raise ValueError(f"step: y must hold {2 * b if guided else b} labels, got {y.shape[0]}")
        slot = self._slot(n, (int(x.shape[2]), int(x.shape[3])))
        cuda = self._cuda
        half = n // 2 if guided else n
        condition = self._condition
        xbuf, ybuf = slot.buffers["x_t"], slot.buffers[condition]
        if y.dtype != ybuf.dtype or tuple(y.shape[1:]) != tuple(ybuf.shape[1:]):
            raise ValueError(f"step: {condition} must be {ybuf.dtype} rows of shape "
                             f"{tuple(ybuf.shape[1:])}, got {y.dtype} {tuple(y.shape)}")
        row = y.row_bytes
        state = xbuf[0:b]
        if not (x is self._last_out and self._last_key == (n, guided, slot.size)):
            cuda.copy(state.ptr, x.ptr, x.nbytes)
            if guided:
                cuda.copy(xbuf[half:half + b].ptr, x.ptr, x.nbytes)
        if slot.bound_y is not y:
            if guided:
                cuda.copy(ybuf.ptr, y.ptr, row * b)
                cuda.copy(ybuf[half:half + b].ptr, y[b:2 * b].ptr, row * b)
            else:
                cuda.copy(ybuf.ptr, y.ptr, row * b)
            slot.bound_y = y  # holding the reference keeps the identity test sound
        cuda.copy(slot.buffers["params"].ptr, cuda.params(t, dt, 1.0 if not guided else guidance),
                  12)
        graph = slot.graphs.get(guided)
        if graph:
            cuda.launch_graph(graph)
        else:
            if graph is None and self.cuda_graphs:
                self._enqueue_models(slot)  # TensorRT's first enqueue happens outside capture
                graph = self._capture(slot, guided)
            if graph:
                cuda.launch_graph(graph)
            else:
                self._enqueue_step(slot, guided)
        self._last_out = state
        self._last_key = (n, guided, slot.size)
        return state

    def _enqueue_models(self, slot: _Slot) -> None:
        cuda = self._cuda
        cuda.launch("fill_t", slot.batch, (slot.buffers["t"].ptr, slot.buffers["params"].ptr,
                                           slot.batch),
                    (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong))
        self._engines["dit"].execute(slot.batch, cuda.stream_handle)
        self._engines["decoder"].execute(slot.batch, cuda.stream_handle)

    def _enqueue_step(self, slot: _Slot, guided: bool) -> None:
        self._enqueue_models(slot)
        per_row = numel(slot.shapes["x_t"][1:])
        half = (slot.batch // 2 if guided else slot.batch) * per_row
        self._cuda.launch("euler_update", half,
                          (slot.buffers["x_t"].ptr, slot.buffers["v"].ptr,
                           slot.buffers["params"].ptr, half, int(guided)),
                          (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                           ctypes.c_int))

    def _capture(self, slot: _Slot, guided: bool) -> Any:
        cuda = self._cuda
        cuda.begin_capture()
        try:
            self._enqueue_step(slot, guided)
        except BaseException:
            cuda.end_capture()
            slot.graphs[guided] = False
            raise
        graph = cuda.end_capture()
        if graph is None:
            warnings.warn(
                f"CUDA graph capture failed for engine batch {slot.batch}; running that step "
                "without a graph", RuntimeWarning, stacklevel=3)
            slot.graphs[guided] = False
            return False
        slot.graphs[guided] = graph
        return graph

    # -- lifetime -----------------------------------------------------------------------------

    def synchronize(self) -> None:
        if self._cuda is not None:
            self._cuda.synchronize()

    def describe(self) -> dict[str, Any]:
        """What runs where: for logs and benchmark reports."""
        return {
            "backend": "tensorrt",
            "precision": self.precision,
            "engines": {g: r.relpath for g, r in self.resolved.items()},
            "engine_batches": list(self.batches),
            "tensorrt": self.environment.tensorrt_version,
            "gpu": self.environment.gpu_name,
            "compute_capability": self.environment.compute_capability,
            "activation_bytes": self._memory[1],
            "sizes": self.sizes.describe(),
            "cuda_graphs": {f"{n}{'g' if g else 'u'}@{h}x{w}": bool(e)
                            for (n, h, w), s in self._slots.items()
                            for g, e in s.graphs.items()},
        }

    def close(self) -> None:
        """Release graphs, contexts, engines and device memory."""
        cuda = self._cuda
        if cuda is None:
            return
        try:
            cuda.synchronize()
        finally:
            for slot in self._slots.values():
                for g in slot.graphs.values():
                    if g:
                        cuda.destroy_graph(g)
            self._slots.clear()
            self._bound.clear()
            self._last_out = None
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
            cuda.close()
            self._cuda = None
