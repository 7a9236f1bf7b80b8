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
from runtimes.backends.tensorrt_keys import (
    EngineEnvironment,
    ResolvedEngine,
    guided_engine_batch,
    resolve_engine,
    unguided_engine_batch,
)
from runtimes.bundle import GRAPH_IO, BundleError, Manifest, read_manifest, sha256_file

__all__ = [
    "INSTALL_HINT",
    "DeviceArray",
    "EngineRunner",
    "TensorRTBackend",
    "cuda_environment",
    "import_cuda",
    "import_tensorrt",
]

INSTALL_HINT = (
    "install it with `pip install 'deco-export[tensorrt]'` (tensorrt>=10 and cuda-python; the "
    "TensorRT wheels download from NVIDIA's package index) on a Linux or Windows machine with an "
    "NVIDIA GPU and driver: TensorRT builds and runs engines only on that GPU"
)
_DTYPES = {"float32": (4, "float32"), "int64": (8, "int64")}


# ---------------------------------------------------------------------------------------------
# Lazy imports


def import_tensorrt() -> Any:
    """``tensorrt``, or a BackendError naming the install and the GPU it needs."""
    try:
        import tensorrt
    except ImportError as exc:  # also a wheel whose libnvinfer / libnvonnxparser fail to load
        raise BackendError(f"TensorRT is not available ({exc}); {INSTALL_HINT}") from exc
    return tensorrt


@dataclass
class _CudaModules:
    runtime: Any
    driver: Any
    nvrtc: Any


def import_cuda() -> _CudaModules:
    """cuda-python's runtime, driver and NVRTC bindings (``cuda.bindings``, or the pre-12.6
    ``cuda`` layout)."""
    try:
        from cuda.bindings import driver, nvrtc
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[no-redef]
            from cuda import cudart, nvrtc  # type: ignore[no-redef]
        except ImportError as exc:
            raise BackendError(
                f"cuda-python is not available ({exc}); the TensorRT backend drives the GPU "
                f"through it: {INSTALL_HINT}"
            ) from exc
    return _CudaModules(cudart, driver, nvrtc)


def _ok(result: Any, what: str) -> Any:
    """Unwrap a cuda-python ``(err, value...)`` tuple, raising BackendError on failure."""
    if not isinstance(result, tuple):
        result = (result,)
    err = result[0]
    code = int(getattr(err, "value", err))
    if code != 0:
        raise BackendError(f"{what} failed: {getattr(err, 'name', err)} ({code})")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def cuda_environment(trt: Any, cuda: _CudaModules, device_id: int = 0) -> EngineEnvironment:
    """This machine's TensorRT version, GPU name and compute capability (the engine key's
    environment fields)."""
    cudart = cuda.runtime
    props = _ok(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\x00", 1)[0].decode("utf-8", "replace")
    return EngineEnvironment(str(trt.__version__), str(name).strip(),
                             f"{int(props.major)}.{int(props.minor)}")


# ---------------------------------------------------------------------------------------------
# Device memory and the three elementwise kernels

_KERNELS = r"""
extern "C" __global__ void lincomb(float* out, const float* x, const float* y, float a, float b,
                                   long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        out[i] = y ? a * x[i] + b * y[i] : a * x[i];
    }
}
// t_in[i] = params[0]: the step time, read from device memory so a captured graph sees each
// step's value.
extern "C" __global__ void fill_t(float* t_in, const float* params, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        t_in[i] = params[0];
    }
}
// One Euler step on the state held in x (the engines' x_t buffer), params = {t, dt, w}.
// guided: x holds [state | pad; state | pad] in two halves of `half` elements and v = [u; c];
// both halves get x + dt * (u + w * (c - u)), the sampler's guidance and update.
// unguided: x += dt * v.
extern "C" __global__ void euler_update(float* x, const float* v, const float* params,
                                        long long half, int guided) {
    const float dt = params[1];
    const float w = params[2];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < half;
         i += (long long)blockDim.x * gridDim.x) {
        if (guided) {
            const float u = v[i];
            const float g = u + (v[half + i] - u) * w;
            const float xn = x[half + i] + g * dt;
            x[i] = xn;
            x[half + i] = xn;
        } else {
            x[i] = x[i] + v[i] * dt;
        }
    }
}
"""
_THREADS = 256
_MAX_BLOCKS = 8192


class _Cuda:
    """One device, one stream, the NVRTC kernels, a caching allocator and the step-parameter
    table. Everything is ordered on ``self.stream``, which is what makes reusing a freed block
    or a parameter slot safe without events."""

    def __init__(self, device_id: int = 0, *, param_capacity: int = 4096) -> None:
        self.mods = import_cuda()
        self.cudart = self.mods.runtime
        self.device_id = int(device_id)
        _ok(self.cudart.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")
        _ok(self.cudart.cudaFree(0), "CUDA context creation")  # make the primary context current
        self.stream = _ok(
            self.cudart.cudaStreamCreateWithFlags(getattr(self.cudart, "cudaStreamNonBlocking", 1)),
            "cudaStreamCreateWithFlags")
        self.stream_handle = int(self.stream)
        self._cu_stream = self.mods.driver.CUstream(self.stream_handle)
        self._module, self._fns = self._compile()
        self._free: dict[int, list[int]] = {}
        self._owned: list[int] = []
        self.closed = False
        # (t, dt, w) records: pinned host + device tables, append-only until full.
        self._param_capacity = int(param_capacity)
        self._param_host = _ok(self.cudart.cudaMallocHost(16 * self._param_capacity),
                               "cudaMallocHost")
        self._param_dev = self.malloc(16 * self._param_capacity)
        self._param_index: dict[tuple[float, float, float], int] = {}

    # -- kernels ------------------------------------------------------------------------------

    def _compile(self) -> tuple[Any, dict[str, Any]]:
        nvrtc, driver = self.mods.nvrtc, self.mods.driver
        props = _ok(self.cudart.cudaGetDeviceProperties(self.device_id), "cudaGetDeviceProperties")
        arch = f"{int(props.major)}{int(props.minor)}"
        prog = _ok(nvrtc.nvrtcCreateProgram(_KERNELS.encode(), b"deco_kernels.cu", 0, [], []),
                   "nvrtcCreateProgram")
        # --fmad=false: the fused step rounds exactly like the sampler's separate operations.
        image = None
        for target, getter in ((f"sm_{arch}", "CUBIN"), (f"compute_{arch}", "PTX")):
            opts = [b"--fmad=false", f"--gpu-architecture={target}".encode()]
            err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
            if int(getattr(err, "value", err)) != 0:
                continue
            size = _ok(getattr(nvrtc, f"nvrtcGet{getter}Size")(prog), "nvrtcGetSize")
            buf = b" " * size
            _ok(getattr(nvrtc, f"nvrtcGet{getter}")(prog, buf), f"nvrtcGet{getter}")
            image = buf
            break
        if image is None:
            log_size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * log_size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise BackendError(
                f"NVRTC could not compile the backend's kernels for sm_{arch}: "
                f"{log.decode(errors='replace').strip()}; install a cuda-python/NVRTC that "
                f"supports this GPU"
            )
        nvrtc.nvrtcDestroyProgram(prog)
        data = np.char.array(image)
        module = _ok(driver.cuModuleLoadData(data.ctypes.data), "cuModuleLoadData")
        fns = {name: _ok(driver.cuModuleGetFunction(module, name.encode()),
                         f"cuModuleGetFunction({name})")
               for name in ("lincomb", "fill_t", "euler_update")}
        return module, fns

    def launch(self, name: str, n: int, values: tuple, types: tuple) -> None:
        blocks = max(1, min(_MAX_BLOCKS, (int(n) + _THREADS - 1) // _THREADS))
        _ok(self.mods.driver.cuLaunchKernel(self._fns[name], blocks, 1, 1, _THREADS, 1, 1, 0,
                                            self._cu_stream, (values, types), 0),
            f"kernel {name}")

    # -- memory -------------------------------------------------------------------------------

    @staticmethod
    def _round(nbytes: int) -> int:
        return max(512, (int(nbytes) + 511) // 512 * 512)

    def malloc(self, nbytes: int) -> int:
        """A block that lives until ``close`` (slot buffers, activation memory, tables)."""
        ptr = _ok(self.cudart.cudaMalloc(self._round(nbytes)), f"cudaMalloc({nbytes} bytes)")
        self._owned.append(int(ptr))
        return int(ptr)

    def free_owned(self, ptr: int) -> None:
        self.synchronize()
        if ptr in self._owned:
            self._owned.remove(ptr)
            _ok(self.cudart.cudaFree(ptr), "cudaFree")

    def take(self, nbytes: int) -> _Block:
        """A pooled block for a temporary array; it returns to the pool when the array dies."""
        size = self._round(nbytes)
        free = self._free.get(size)
        ptr = free.pop() if free else int(_ok(self.cudart.cudaMalloc(size),
                                              f"cudaMalloc({size} bytes)"))
        return _Block(ptr, size, self)

    def give_back(self, ptr: int, size: int) -> None:
        if self.closed:
            try:
                self.cudart.cudaFree(ptr)
            except Exception:  # interpreter shutdown
                pass
            return
        self._free.setdefault(size, []).append(ptr)

    def copy(self, dst: int, src: int, nbytes: int, kind: str = "DeviceToDevice") -> None:
        if nbytes <= 0 or dst == src:
            return
        k = getattr(self.cudart.cudaMemcpyKind, f"cudaMemcpy{kind}")
        _ok(self.cudart.cudaMemcpyAsync(dst, src, int(nbytes), k, self.stream),
            f"cudaMemcpyAsync {kind}")

    def memset(self, ptr: int, nbytes: int) -> None:
        _ok(self.cudart.cudaMemsetAsync(ptr, 0, int(nbytes), self.stream), "cudaMemsetAsync")

    def synchronize(self) -> None:
        _ok(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    # -- step parameters ----------------------------------------------------------------------

    def params(self, t: float, dt: float, w: float) -> int:
        """Device address of a (t, dt, w) float32 record. Records are uploaded once from pinned
        memory (asynchronously, never rewritten while in flight) and reused by every run with
        the same time grid."""
        key = (float(t), float(dt), float(w))
        index = self._param_index.get(key)
        if index is None:
            if len(self._param_index) >= self._param_capacity:
                self.synchronize()  # every pending copy has read its slot: start over
                self._param_index.clear()
            index = len(self._param_index)
            host = self._param_host + 16 * index
            (ctypes.c_float * 4).from_address(host)[:] = [key[0], key[1], key[2], 0.0]
            self.copy(self._param_dev + 16 * index, host, 16, "HostToDevice")
            self._param_index[key] = index
        return self._param_dev + 16 * index

    # -- CUDA graphs --------------------------------------------------------------------------

    def begin_capture(self) -> None:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _ok(self.cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")

    def end_capture(self) -> Any:
        """Instantiated graph of what was captured (cudaGraphExec_t), or None on failure."""
        result = self.cudart.cudaStreamEndCapture(self.stream)
        if int(getattr(result[0], "value", result[0])) != 0:
            return None
        graph = result[1]
        inst = self.cudart.cudaGraphInstantiate(graph, 0)
        self.cudart.cudaGraphDestroy(graph)
        if int(getattr(inst[0], "value", inst[0])) != 0:
            return None
        return inst[1]

    def launch_graph(self, graph_exec: Any) -> None:
        _ok(self.cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec: Any) -> None:
        try:
            self.cudart.cudaGraphExecDestroy(graph_exec)
        except Exception:
            pass

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.synchronize()
        finally:
            self.closed = True
            for ptrs in self._free.values():
                for ptr in ptrs:
                    self.cudart.cudaFree(ptr)
            self._free.clear()
            for ptr in self._owned:
                self.cudart.cudaFree(ptr)
            self._owned.clear()
            self.cudart.cudaFreeHost(self._param_host)
            self.mods.driver.cuModuleUnload(self._module)
            self.cudart.cudaStreamDestroy(self.stream)


class _Block:
    """A pooled device allocation; returns itself to the pool when garbage-collected."""

    __slots__ = ("cuda", "ptr", "size")

    def __init__(self, ptr: int, size: int, cuda: _Cuda | None) -> None:
        self.ptr = ptr
        self.size = size
        self.cuda = cuda

    def __del__(self) -> None:
        if self.cuda is not None:
            self.cuda.give_back(self.ptr, self.size)


class DeviceArray:
    """A contiguous float32 or int64 device array with the operations the sampler uses.

    ``+`` / ``-`` with another DeviceArray of the same shape, ``*`` with a Python float, and
    contiguous batch slices ``a[i:j]`` (views, no copy). Arithmetic runs on the backend's stream
    and allocates its result from the backend's pool.
    """

    __slots__ = ("_base", "_cuda", "dtype", "ptr", "shape")
    __array_priority__ = 1000  # numpy scalars on the left defer to the reflected operators

    def __init__(self, cuda: _Cuda, ptr: int, shape: tuple[int, ...], dtype: str,
                 base: Any = None) -> None:
        self._cuda = cuda
        self.ptr = int(ptr)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._base = base  # keeps the allocation alive (a _Block, a slot, ...)

    @classmethod
    def empty(cls, cuda: _Cuda, shape: Sequence[int], dtype: str = "float32") -> DeviceArray:
        nbytes = _numel(shape) * _DTYPES[dtype][0]
        block = cuda.take(nbytes)
        return cls(cuda, block.ptr, tuple(shape), dtype, block)

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0]

    @property
    def size(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def row_bytes(self) -> int:
        return _numel(self.shape[1:]) * self.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> DeviceArray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("DeviceArray supports only contiguous batch slices such as a[:B]")
        start, stop, _ = key.indices(self.shape[0])
        stop = max(start, stop)
        return DeviceArray(self._cuda, self.ptr + start * self.row_bytes,
                           (stop - start, *self.shape[1:]), self.dtype, self)

    def _lincomb(self, a: float, other: DeviceArray | None, b: float) -> DeviceArray:
        if self.dtype != "float32" or (other is not None and other.dtype != "float32"):
            raise TypeError("DeviceArray arithmetic is defined for float32 arrays only")
        if other is not None and other.shape != self.shape:
            raise ValueError(f"shape mismatch: {self.shape} and {other.shape}")
        out = DeviceArray.empty(self._cuda, self.shape, "float32")
        self._cuda.launch(
            "lincomb", self.size,
            (out.ptr, self.ptr, 0 if other is None else other.ptr, float(a), float(b), self.size),
            (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_float,
             ctypes.c_longlong))
        return out

    def __add__(self, other: Any) -> DeviceArray:
        if not isinstance(other, DeviceArray):
            return NotImplemented
        return self._lincomb(1.0, other, 1.0)

    def __sub__(self, other: Any) -> DeviceArray:
        if not isinstance(other, DeviceArray):
            return NotImplemented
        return self._lincomb(1.0, other, -1.0)

    def __mul__(self, other: Any) -> DeviceArray:
        if isinstance(other, (int, float, np.floating, np.integer)) and not isinstance(other, bool):
            return self._lincomb(float(other), None, 0.0)
        return NotImplemented

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------
# Engines


def _trt_dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.INT64: "int64"}
    if dtype not in names:
        raise BackendError(
            f"engine I/O dtype {dtype} is not float32/int64; graph inputs and outputs must be "
            "float32 or int64 (reduced precision lives inside the graph): export again"
        )
    return names[dtype]


class _Engine:
    """One deserialised engine: its I/O, its static profiles by batch, and one execution
    context per batch (created on first use, user-managed device memory)."""

    def __init__(self, trt: Any, runtime: Any, path: Path, graph: str) -> None:
        self.trt = trt
        self.graph = graph
        self.path = path
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(
                f"{path}: TensorRT could not deserialise this engine (see the TensorRT log "
                f"above); rebuild it with `deco export tensorrt BUNDLE --force`"
            )
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _trt_dtype_name(trt, engine.get_tensor_dtype(n)) for n in names}
        want_in, want_out = GRAPH_IO[graph]
        if set(self.inputs) != set(want_in) or not set(want_out[:1]) <= set(self.outputs):
            raise BackendError(
                f"{path}: the {graph} engine has inputs {self.inputs} and outputs "
                f"{self.outputs}, expected {list(want_in)} -> {list(want_out)}; rebuild it"
            )
        self.profiles: dict[int, int] = {}
        first = self.inputs[0]
        for p in range(engine.num_optimization_profiles):
            lo, _, hi = engine.get_tensor_profile_shape(first, p)
            if int(lo[0]) != int(hi[0]):
                raise BackendError(
                    f"{path}: profile {p} has a batch range {lo[0]}..{hi[0]}; this backend runs "
                    "static profiles only (one per engine batch); rebuild the engine"
                )
            self.profiles[int(hi[0])] = p
        self.contexts: dict[int, Any] = {}

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted(self.profiles))

    def memory_size(self, batch: int) -> int:
        p = self.profiles[batch]
        getter = getattr(self.engine, "get_device_memory_size_for_profile_v2", None)
        if getter is None:  # TensorRT 10.0
            return int(self.engine.get_device_memory_size_for_profile(p))
        return int(getter(p))

    def context(self, batch: int, shapes: Mapping[str, Sequence[int]],
                addresses: Mapping[str, int], memory: tuple[int, int], stream: int) -> Any:
        ctx = self.contexts.get(batch)
        if ctx is not None:
            return ctx
        trt = self.trt
        ctx = self.engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise BackendError(f"{self.path}: TensorRT could not create an execution context")
        _set_memory(ctx, *memory)
        ctx.set_optimization_profile_async(self.profiles[batch], stream)
        for name in self.inputs:
            if not ctx.set_input_shape(name, tuple(int(s) for s in shapes[name])):
                raise BackendError(
                    f"{self.path}: input {name} shape {tuple(shapes[name])} is outside profile "
                    f"{self.profiles[batch]}; rebuild the engines"
                )
        for name in (*self.inputs, *self.outputs):
            if not ctx.set_tensor_address(name, int(addresses[name])):
                raise BackendError(f"{self.path}: TensorRT rejected the address of {name}")
        self.contexts[batch] = ctx
        return ctx

    def rebind_memory(self, memory: tuple[int, int]) -> None:
        for ctx in self.contexts.values():
            _set_memory(ctx, *memory)

    def execute(self, batch: int, stream: int) -> None:
        if not self.contexts[batch].execute_async_v3(stream):
            raise BackendError(f"{self.path}: TensorRT execution failed (batch {batch})")

    def close(self) -> None:
        self.contexts.clear()
        self.engine = None


def _set_memory(ctx: Any, ptr: int, size: int) -> None:
    setter = getattr(ctx, "set_device_memory", None)
    if setter is not None:
        setter(int(ptr), int(size))
    else:  # TensorRT 10.0
        ctx.device_memory = int(ptr)


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
        self._cuda: _Cuda | None = None
        self._engines: dict[str, _Engine] = {}
        self._slots: dict[int, _Slot] = {}
        self._memory = (0, 0)
        self._last_out: DeviceArray | None = None
        self._last_key: tuple[int, bool] | None = None
        self.resolved: dict[str, ResolvedEngine] = {}
        try:
            self._cuda = _Cuda(device_id)
            env = cuda_environment(trt, self._cuda.mods, device_id)
            self.environment = env
            hint = rebuild_hint or (
                f"build engines for this machine with `deco export tensorrt {self.bundle_dir} "
                f"--precision {precision}`")
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            for graph in ("dit", "decoder", "refresh"):
                art = self.manifest.get_artifact("tensorrt", graph, precision)
                if art is None:
                    if graph == "refresh":
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
                self._engines[graph] = _Engine(trt, self._runtime, path, graph)
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
            nbytes = _numel(shape) * _DTYPES[dtype][0]
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
        out = np.empty(a.shape, dtype=_DTYPES[a.dtype][1])
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
        per_row = _numel(slot.shapes["x_t"][1:])
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


# ---------------------------------------------------------------------------------------------
# A numpy-in, numpy-out runner for one engine (the exporter's per-graph parity check)


class EngineRunner:
    """Runs one plan file at each of its engine batches on numpy inputs. For checks, not for
    sampling: every call copies to and from the host and synchronises."""

    def __init__(self, plan: str | os.PathLike[str], graph: str, device_id: int = 0) -> None:
        trt = import_tensorrt()
        self._cuda = _Cuda(device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = _Engine(trt, self._runtime, Path(plan), graph)
        self._memory = (0, 0)

    @property
    def batches(self) -> tuple[int, ...]:
        return self.engine.batches

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, engine = self._cuda, self.engine
        n = int(next(iter(feeds.values())).shape[0])
        if n not in engine.profiles:
            raise ValueError(
                f"{engine.path} has no profile for batch {n} (it has {engine.batches})")
        need = engine.memory_size(n)
        if need > self._memory[1]:
            old = self._memory[0]
            self._memory = (cuda.malloc(need), need)
            engine.rebind_memory(self._memory)
            if old:
                cuda.free_owned(old)
        arrays: dict[str, DeviceArray] = {}
        for name in engine.inputs:
            a = np.ascontiguousarray(feeds[name], dtype=_DTYPES[engine.dtypes[name]][1])
            arrays[name] = DeviceArray.empty(cuda, a.shape, engine.dtypes[name])
            cuda.copy(arrays[name].ptr, a.ctypes.data, a.nbytes, "HostToDevice")
            cuda.synchronize()
        ctx = engine.contexts.get(n)
        if ctx is None:
            ctx = engine.engine.create_execution_context(
                engine.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            _set_memory(ctx, *self._memory)
            ctx.set_optimization_profile_async(engine.profiles[n], cuda.stream_handle)
            engine.contexts[n] = ctx
        outs: dict[str, DeviceArray] = {}
        for name in engine.inputs:
            ctx.set_input_shape(name, arrays[name].shape)
            ctx.set_tensor_address(name, arrays[name].ptr)
        for name in engine.outputs:
            shape = tuple(int(s) for s in ctx.get_tensor_shape(name))
            outs[name] = DeviceArray.empty(cuda, shape, engine.dtypes[name])
            ctx.set_tensor_address(name, outs[name].ptr)
        engine.execute(n, cuda.stream_handle)
        result = {}
        for name, arr in outs.items():
            host = np.empty(arr.shape, dtype=_DTYPES[arr.dtype][1])
            cuda.copy(host.ctypes.data, arr.ptr, arr.nbytes, "DeviceToHost")
            result[name] = host
        cuda.synchronize()
        return result

    def close(self) -> None:
        self.engine.close()
        self._cuda.close()
