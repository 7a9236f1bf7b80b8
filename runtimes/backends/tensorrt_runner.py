"""A numpy-in, numpy-out runner for one engine: the exporter's per-graph parity check."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from runtimes.backends.cuda_device import DTYPES, CudaDevice, DeviceArray
from runtimes.backends.tensorrt_engine import Engine, import_tensorrt, set_context_memory
from runtimes.config import ModelConfig


class EngineRunner:
    """Runs one plan file at each of its engine batches on numpy inputs. For checks, not for
    sampling: every call copies to and from the host and synchronises. ``config``: the model
    whose graph the plan is (its record checks the engine's I/O)."""

    def __init__(self, plan: str | os.PathLike[str], graph: str, device_id: int = 0,
                 config: ModelConfig | None = None) -> None:
        trt = import_tensorrt()
        self._cuda = CudaDevice(device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = Engine(trt, self._runtime, Path(plan), graph, config)
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
            a = np.ascontiguousarray(feeds[name], dtype=DTYPES[engine.dtypes[name]][1])
            arrays[name] = DeviceArray.empty(cuda, a.shape, engine.dtypes[name])
            cuda.copy(arrays[name].ptr, a.ctypes.data, a.nbytes, "HostToDevice")
            cuda.synchronize()
        ctx = engine.contexts.get(n)
        if ctx is None:
            ctx = engine.engine.create_execution_context(
                engine.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            set_context_memory(ctx, *self._memory)
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
            host = np.empty(arr.shape, dtype=DTYPES[arr.dtype][1])
            cuda.copy(host.ctypes.data, arr.ptr, arr.nbytes, "DeviceToHost")
            result[name] = host
        cuda.synchronize()
        return result

    def close(self) -> None:
        self.engine.close()
        self._cuda.close()
