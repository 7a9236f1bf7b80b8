"""One deserialised TensorRT engine: its I/O (checked against the bundle's graph I/O), its
static profiles by engine batch, and one execution context per batch with user-managed device
memory; plus ``tensorrt`` itself, imported lazily, and the environment an engine is keyed by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtimes.backend import BackendError
from runtimes.backends.cuda_device import INSTALL_HINT, CudaModules, ok
from runtimes.backends.tensorrt_keys import EngineEnvironment
from runtimes.config import ModelConfig
from runtimes.graphs import get_graph


def import_tensorrt() -> Any:
    """``tensorrt``, or a BackendError naming the install and the GPU it needs."""
    try:
        import tensorrt
    except ImportError as exc:  # also a wheel whose libnvinfer / libnvonnxparser fail to load
        raise BackendError(f"TensorRT is not available ({exc}); {INSTALL_HINT}") from exc
    return tensorrt


def cuda_environment(trt: Any, cuda: CudaModules, device_id: int = 0) -> EngineEnvironment:
    """This machine's TensorRT version, GPU name and compute capability (the engine key's
    environment fields)."""
    cudart = cuda.runtime
    props = ok(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\x00", 1)[0].decode("utf-8", "replace")
    return EngineEnvironment(str(trt.__version__), str(name).strip(),
                             f"{int(props.major)}.{int(props.minor)}")


def trt_dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.INT64: "int64"}
    if dtype not in names:
        raise BackendError(
            f"engine I/O dtype {dtype} is not float32/int64; graph inputs and outputs must be "
            "float32 or int64 (reduced precision lives inside the graph): export again"
        )
    return names[dtype]


class Engine:
    """One deserialised engine: its I/O, its profiles by (static) batch, and one execution
    context per batch (created on first use, user-managed device memory).

    ``config`` is the bundle's model: its graph record is what the engine's I/O must match (a
    text-to-image DiT takes ``text_tokens``, a class-conditional one ``y``; default the
    latter)."""

    def __init__(self, trt: Any, runtime: Any, path: Path, graph: str,
                 config: ModelConfig | None = None) -> None:
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
        self.dtypes = {n: trt_dtype_name(trt, engine.get_tensor_dtype(n)) for n in names}
        spec = get_graph(graph, config or ModelConfig())
        want_in, want_out = spec.input_names, spec.output_names
        if set(self.inputs) != set(want_in) or not set(spec.required_outputs) <= set(self.outputs):
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
        self.bound: dict[int, Any] = {}  # batch -> the (shapes, addresses) its context holds

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
        """The context of engine batch ``batch`` bound to ``shapes`` and ``addresses``: created
        on first use; re-bound (`IExecutionContext.set_input_shape` / `set_tensor_address`)
        when an engine with a dynamic height and width runs another image size, since a
        profile serves one context at a time."""
        key = (tuple(tuple(int(d) for d in shapes[n]) for n in self.inputs),
               tuple(int(addresses[n]) for n in (*self.inputs, *self.outputs)))
        ctx = self.contexts.get(batch)
        if ctx is not None and self.bound.get(batch) == key:
            return ctx
        if ctx is None:
            ctx = self.engine.create_execution_context(
                self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise BackendError(
                    f"{self.path}: TensorRT could not create an execution context")
            set_context_memory(ctx, *memory)
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
        self.bound[batch] = key
        return ctx

    def rebind_memory(self, memory: tuple[int, int]) -> None:
        for ctx in self.contexts.values():
            set_context_memory(ctx, *memory)

    def execute(self, batch: int, stream: int) -> None:
        if not self.contexts[batch].execute_async_v3(stream):
            raise BackendError(f"{self.path}: TensorRT execution failed (batch {batch})")

    def close(self) -> None:
        self.contexts.clear()
        self.bound.clear()
        self.engine = None


def set_context_memory(ctx: Any, ptr: int, size: int) -> None:
    setter = getattr(ctx, "set_device_memory", None)
    if setter is not None:
        setter(int(ptr), int(size))
    else:  # TensorRT 10.0
        ctx.device_memory = int(ptr)
