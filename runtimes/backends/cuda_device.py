"""The CUDA device code of the TensorRT backend, through cuda-python: one device and stream, a
caching allocator, the step-parameter table, three elementwise kernels compiled once with NVRTC
(``lincomb``, ``fill_t``, ``euler_update``), CUDA graph capture, and `DeviceArray`, the
backend's native array (float32 / int64 device buffers with the sampler's arithmetic).

``cuda-python`` (``cuda.bindings``) is imported when a device is opened, never by
``import runtimes``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtimes.backend import BackendError

INSTALL_HINT = (
    "install it with `pip install 'deco-export[tensorrt]'` (tensorrt>=10 and cuda-python; the "
    "TensorRT wheels download from NVIDIA's package index) on a Linux or Windows machine with an "
    "NVIDIA GPU and driver: TensorRT builds and runs engines only on that GPU"
)
DTYPES = {"float32": (4, "float32"), "int64": (8, "int64")}


@dataclass
class CudaModules:
    runtime: Any
    driver: Any
    nvrtc: Any


def import_cuda() -> CudaModules:
    """cuda-python's runtime, driver and NVRTC bindings (``cuda.bindings``, or the pre-12.6
    ``cuda`` layout)."""
    try:
        from cuda.bindings import driver, nvrtc
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[no-redef, unused-ignore]
            from cuda import cudart, nvrtc  # type: ignore[no-redef, unused-ignore]
        except ImportError as exc:
            raise BackendError(
                f"cuda-python is not available ({exc}); the TensorRT backend drives the GPU "
                f"through it: {INSTALL_HINT}"
            ) from exc
    return CudaModules(cudart, driver, nvrtc)


def ok(result: Any, what: str) -> Any:
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


class CudaDevice:
    """One device, one stream, the NVRTC kernels, a caching allocator and the step-parameter
    table. Everything is ordered on ``self.stream``, which is what makes reusing a freed block
    or a parameter slot safe without events."""

    def __init__(self, device_id: int = 0, *, param_capacity: int = 4096) -> None:
        self.mods = import_cuda()
        self.cudart = self.mods.runtime
        self.device_id = int(device_id)
        ok(self.cudart.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")
        ok(self.cudart.cudaFree(0), "CUDA context creation")  # make the primary context current
        self.stream = ok(
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
        self._param_host = ok(self.cudart.cudaMallocHost(16 * self._param_capacity),
                               "cudaMallocHost")
        self._param_dev = self.malloc(16 * self._param_capacity)
        self._param_index: dict[tuple[float, float, float], int] = {}

    # -- kernels ------------------------------------------------------------------------------

    def _compile(self) -> tuple[Any, dict[str, Any]]:
        nvrtc, driver = self.mods.nvrtc, self.mods.driver
        props = ok(self.cudart.cudaGetDeviceProperties(self.device_id), "cudaGetDeviceProperties")
        arch = f"{int(props.major)}{int(props.minor)}"
        prog = ok(nvrtc.nvrtcCreateProgram(_KERNELS.encode(), b"deco_kernels.cu", 0, [], []),
                   "nvrtcCreateProgram")
        # --fmad=false: the fused step rounds exactly like the sampler's separate operations.
        image = None
        for target, getter in ((f"sm_{arch}", "CUBIN"), (f"compute_{arch}", "PTX")):
            opts = [b"--fmad=false", f"--gpu-architecture={target}".encode()]
            err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
            if int(getattr(err, "value", err)) != 0:
                continue
            size = ok(getattr(nvrtc, f"nvrtcGet{getter}Size")(prog), "nvrtcGetSize")
            buf = b" " * size
            ok(getattr(nvrtc, f"nvrtcGet{getter}")(prog, buf), f"nvrtcGet{getter}")
            image = buf
            break
        if image is None:
            log_size = ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * log_size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise BackendError(
                f"NVRTC could not compile the backend's kernels for sm_{arch}: "
                f"{log.decode(errors='replace').strip()}; install a cuda-python/NVRTC that "
                f"supports this GPU"
            )
        nvrtc.nvrtcDestroyProgram(prog)
        data = np.char.array(image)
        module = ok(driver.cuModuleLoadData(data.ctypes.data), "cuModuleLoadData")
        fns = {name: ok(driver.cuModuleGetFunction(module, name.encode()),
                         f"cuModuleGetFunction({name})")
               for name in ("lincomb", "fill_t", "euler_update")}
        return module, fns

    def launch(self, name: str, n: int, values: tuple[Any, ...], types: tuple[Any, ...]) -> None:
        blocks = max(1, min(_MAX_BLOCKS, (int(n) + _THREADS - 1) // _THREADS))
        ok(self.mods.driver.cuLaunchKernel(self._fns[name], blocks, 1, 1, _THREADS, 1, 1, 0,
                                            self._cu_stream, (values, types), 0),
            f"kernel {name}")

    # -- memory -------------------------------------------------------------------------------

    @staticmethod
    def _round(nbytes: int) -> int:
        return max(512, (int(nbytes) + 511) // 512 * 512)

    def malloc(self, nbytes: int) -> int:
        """A block that lives until ``close`` (slot buffers, activation memory, tables)."""
        ptr = ok(self.cudart.cudaMalloc(self._round(nbytes)), f"cudaMalloc({nbytes} bytes)")
        self._owned.append(int(ptr))
        return int(ptr)

    def free_owned(self, ptr: int) -> None:
        self.synchronize()
        if ptr in self._owned:
            self._owned.remove(ptr)
            ok(self.cudart.cudaFree(ptr), "cudaFree")

    def take(self, nbytes: int) -> _Block:
        """A pooled block for a temporary array; it returns to the pool when the array dies."""
        size = self._round(nbytes)
        free = self._free.get(size)
        ptr = free.pop() if free else int(ok(self.cudart.cudaMalloc(size),
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
        ok(self.cudart.cudaMemcpyAsync(dst, src, int(nbytes), k, self.stream),
            f"cudaMemcpyAsync {kind}")

    def memset(self, ptr: int, nbytes: int) -> None:
        ok(self.cudart.cudaMemsetAsync(ptr, 0, int(nbytes), self.stream), "cudaMemsetAsync")

    def synchronize(self) -> None:
        ok(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

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
        ok(self.cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")

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
        ok(self.cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

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

    def __init__(self, ptr: int, size: int, cuda: CudaDevice | None) -> None:
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

    def __init__(self, cuda: CudaDevice, ptr: int, shape: tuple[int, ...], dtype: str,
                 base: Any = None) -> None:
        self._cuda = cuda
        self.ptr = int(ptr)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._base = base  # keeps the allocation alive (a _Block, a slot, ...)

    @classmethod
    def empty(cls, cuda: CudaDevice, shape: Sequence[int], dtype: str = "float32") -> DeviceArray:
        nbytes = numel(shape) * DTYPES[dtype][0]
        block = cuda.take(nbytes)
        return cls(cuda, block.ptr, tuple(shape), dtype, block)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def size(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def row_bytes(self) -> int:
        return numel(self.shape[1:]) * self.itemsize

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


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
