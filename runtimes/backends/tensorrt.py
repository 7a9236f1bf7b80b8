"""TensorRT backend: runs a bundle's "dit", "decoder" (and optional "refresh") engines.

The engines are the ones ``deco export tensorrt BUNDLE`` built for this machine; an engine
built for another TensorRT version or GPU, or from an ONNX graph that has since changed, is
refused with the reason and the fix before it is deserialised (`tensorrt_keys.resolve_engine`).

How it runs (one CUDA stream, no host synchronisation between the first and the last step):

* **Device memory.** Per engine batch (a "slot": the batch sizes the engines were built for,
  see `tensorrt_keys`) the I/O buffers x_t, t, y, cond, hidden and v are allocated once, on
  first use, and every execution context of that batch is bound to them once. The DiT writes
  ``cond`` where the decoder reads it, so the two engines hand over without a copy. All
  contexts are created with user-managed device memory and share one activation buffer, sized
  to the largest profile used so far (the engines run one after the other on one stream).
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

from runtimes.backend import BackendError
from runtimes.backends.cuda_device import (
    DTYPES,
    INSTALL_HINT,
    CudaDevice,
    DeviceArray,
    import_cuda,
    numel,
)
from runtimes.backends.tensorrt_engine import Engine, cuda_environment, import_tensorrt
from runtimes.backends.tensorrt_keys import (
    ResolvedEngine,
    guided_engine_batch,
    resolve_engine,
    unguided_engine_batch,
)
from runtimes.backends.tensorrt_runner import EngineRunner
from runtimes.bundle import BundleError, Manifest, read_manifest, sha256_file
from runtimes.graphs import graphs_for

__all__ = [
    "INSTALL_HINT",
    "DeviceArray",
    "EngineRunner",
    "TensorRTBackend",
    "cuda_environment",
    "import_cuda",
    "import_tensorrt",
]


@dataclass
class _Slot:
    """The I/O buffers of one engine batch, shared by every engine's context at that batch."""

    batch: int
    buffers: dict[str, DeviceArray]
    shapes: dict[str, tuple[int, ...]]
    bound_y: Any = None  # the label array last copied into "y"
    graphs: dict[bool, Any] = field(default_factory=dict)  # guided -> cudaGraphExec_t or False


# ---------------------------------------------------------------------------------------------
# The backend


class TensorRTBackend:
    """Runs a bundle's TensorRT engines (see the module docstring).

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
        self._slots: dict[int, _Slot] = {}
        self._memory = (0, 0)
        self._last_out: DeviceArray | None = None
        self._last_key: tuple[int, bool] | None = None
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
                self._engines[graph] = Engine(trt, self._runtime, path, graph)
        except BaseException:
            self.close()
            raise
        model = self.manifest.model
        key = self.resolved["dit"].key
        self.image_size = tuple(key.image_size)
        self.batches = tuple(sorted(set.intersection(
            *(set(e.batches) for e in self._engines.values()))))
        self.null_class = int(model.num_classes)
        self._c = int(model.in_channels)
        self._tokens = model.num_tokens(*self.image_size)
        self._d = int(model.hidden_size)
        self.supports_refresh = "refresh" in self._engines and (
            "hidden" in self._engines["dit"].outputs)

    # -- slots and contexts -------------------------------------------------------------------

    def _slot(self, n: int) -> _Slot:
        slot = self._slots.get(n)
        if slot is not None:
            return slot
        cuda = self._cuda
        h, w = self.image_size
        shapes = {"x_t": (n, self._c, h, w), "t": (n,), "y": (n,),
                  "cond": (n, self._tokens, self._d), "hidden": (n, self._tokens, self._d),
                  "v": (n, self._c, h, w), "params": (4,)}
        buffers: dict[str, DeviceArray] = {}
        for name, shape in shapes.items():
            dtype = "int64" if name == "y" else "float32"
            nbytes = numel(shape) * DTYPES[dtype][0]
            ptr = cuda.malloc(nbytes)
            cuda.memset(ptr, nbytes)
            buffers[name] = DeviceArray(cuda, ptr, shape, dtype, "slot")
        # Padding rows must hold a valid label: fill y with the null class once.
        nulls = (ctypes.c_int64 * n)(*([self.null_class] * n))
        cuda.copy(buffers["y"].ptr, ctypes.addressof(nulls), 8 * n, "HostToDevice")
        cuda.synchronize()  # `nulls` is pageable host memory: let the copy finish
        need = max(e.memory_size(n) for e in self._engines.values())
        if need > self._memory[1]:
            self._grow_memory(need)
        slot = _Slot(n, buffers, shapes)
        addresses = {name: buf.ptr for name, buf in buffers.items()}
        for engine in self._engines.values():
            engine.context(n, shapes, addresses, self._memory, self._cuda.stream_handle)
        self._slots[n] = slot
        return slot

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
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"these engines were built for {self.image_size[0]}x{self.image_size[1]} images, "
                f"got {x.shape[2]}x{x.shape[3]}; build engines for that size from an ONNX export "
                f"at that size"
            )

    def _run(self, graph: str, feeds: Mapping[str, DeviceArray], output: str) -> DeviceArray:
        rows = int(next(iter(feeds.values())).shape[0])
        n = unguided_engine_batch(rows, self.batches)
        slot = self._slot(n)
        cuda = self._cuda
        self._last_out = None  # a fused step's state in this slot may be overwritten below
        for name, arr in feeds.items():
            buf = slot.buffers[name]
            if arr.dtype != buf.dtype:
                raise TypeError(f"{graph} input {name} must be {buf.dtype}, got {arr.dtype}")
            cuda.copy(buf.ptr, arr.ptr, arr.nbytes)
            if name == "y":
                slot.bound_y = None
        self._engines[graph].execute(n, cuda.stream_handle)
        src = slot.buffers[output]
        out = DeviceArray.empty(cuda, (rows, *src.shape[1:]), "float32")
        cuda.copy(out.ptr, src.ptr, out.nbytes)
        return out

    # -- Backend protocol ---------------------------------------------------------------------

    def dit(self, x_t: DeviceArray, t: DeviceArray, y: DeviceArray) -> DeviceArray:
        self._check_batch(x_t)
        return self._run("dit", {"x_t": x_t, "t": t, "y": y}, "cond")

    def dit_hidden(self, x_t: DeviceArray, t: DeviceArray, y: DeviceArray) -> DeviceArray:
        if not self.supports_refresh:
            raise BackendError("these engines have no refresh graph; export the bundle with "
                               "the refresh graph and rebuild to use fresh-t sharing")
        self._check_batch(x_t)
        return self._run("dit", {"x_t": x_t, "t": t, "y": y}, "hidden")

    def refresh_condition(self, hidden: DeviceArray, t: DeviceArray) -> DeviceArray:
        if not self.supports_refresh:
            raise BackendError("these engines have no refresh graph; rebuild with it")
        return self._run("refresh", {"hidden": hidden, "t": t}, "cond")

    def decoder(self, x_t: DeviceArray, cond: DeviceArray) -> DeviceArray:
        self._check_batch(x_t)
        return self._run("decoder", {"x_t": x_t, "cond": cond}, "v")

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

        guidance None: unguided, ``y`` holds the B labels. A float ``w``: guided, ``y`` holds
        the 2B labels [null; labels] and v = v_u + w (v_c - v_u). The returned array is a view
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
        slot = self._slot(n)
        cuda = self._cuda
        half = n // 2 if guided else n
        xbuf, ybuf = slot.buffers["x_t"], slot.buffers["y"]
        state = xbuf[0:b]
        if not (x is self._last_out and self._last_key == (n, guided)):
            cuda.copy(state.ptr, x.ptr, x.nbytes)
            if guided:
                cuda.copy(xbuf[half:half + b].ptr, x.ptr, x.nbytes)
        if slot.bound_y is not y:
            if guided:
                cuda.copy(ybuf.ptr, y.ptr, 8 * b)
                cuda.copy(ybuf[half:half + b].ptr, y[b:2 * b].ptr, 8 * b)
            else:
                cuda.copy(ybuf.ptr, y.ptr, 8 * b)
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
        self._last_key = (n, guided)
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
            "cuda_graphs": {f"{n}{'g' if g else 'u'}": bool(e) for n, s in self._slots.items()
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
            self._last_out = None
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
            cuda.close()
            self._cuda = None
