"""A recording stand-in for the CUDA device and TensorRT engines, shared by the TensorRT tests:
no TensorRT, no CUDA. It checks which copies, kernels and graph calls the backend issues, not
what they compute."""

from __future__ import annotations

from types import SimpleNamespace

from runtimes.backends import tensorrt_keys as tk

TINY = {"hidden_size": 64, "num_heads": 4, "dit_depth": 2, "decoder_hidden_size": 32,
        "decoder_depth": 3, "patch_size": 16, "num_classes": 10, "in_channels": 3,
        "image_size": [64, 64]}
T2I = dict(TINY, num_classes=0, family="t2i", text_len=8, text_dim=48, refine_depth=1)
H100 = tk.EngineEnvironment("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
A100 = tk.EngineEnvironment("10.8.0.43", "NVIDIA A100-SXM4-80GB", "8.0")


class RecordingCuda:
    stream_handle = 7

    def __init__(self):
        self.calls: list[tuple] = []
        self._next = 1 << 20
        self.records: dict[tuple, int] = {}

    def _alloc(self, nbytes):
        ptr, self._next = self._next, self._next + ((nbytes + 511) // 512 + 1) * 512
        return ptr

    def malloc(self, nbytes):
        return self._alloc(nbytes)

    def free_owned(self, ptr):
        pass

    def take(self, nbytes):
        from runtimes.backends.cuda_device import _Block

        return _Block(self._alloc(nbytes), nbytes, None)

    def copy(self, dst, src, nbytes, kind="DeviceToDevice"):
        if nbytes > 0 and dst != src:
            self.calls.append(("copy", dst, src, nbytes, kind))

    def memset(self, ptr, nbytes):
        pass

    def synchronize(self):
        pass

    def launch(self, name, n, values, types):
        assert len(values) == len(types)
        self.calls.append(("kernel", name, *values))

    def params(self, t, dt, w):
        return self.records.setdefault((t, dt, w), 0xA000 + 16 * len(self.records))

    def begin_capture(self):
        self.calls.append(("begin_capture",))

    def end_capture(self):
        self.calls.append(("end_capture",))
        self.graphs = getattr(self, "graphs", 0) + 1
        return f"graph{self.graphs}"

    def launch_graph(self, graph):
        self.calls.append(("launch_graph", graph))

    def destroy_graph(self, graph):
        pass

    def take_calls(self):
        calls, self.calls = self.calls, []
        return calls


class RecordingEngine:
    def __init__(self, cuda, graph, outputs):
        self.cuda, self.graph, self.outputs = cuda, graph, outputs

    def memory_size(self, batch):
        return 1024 * batch

    def context(self, batch, shapes, addresses, memory, stream):
        # the DiT's condition is labels (c2i) or text tokens (t2i, with text_embed's text)
        assert set(addresses) >= {"x_t", "t", "cond", "hidden", "v"}
        assert len(set(addresses) & {"y", "text_tokens"}) == 1
        assert ("text" in addresses) == ("text_tokens" in addresses)

    def rebind_memory(self, memory):
        pass

    def execute(self, batch, stream):
        self.cuda.calls.append(("execute", self.graph, batch))

    def close(self):
        pass


def recording_backend(sizes=None, model=TINY):
    from runtimes.backends.tensorrt import TensorRTBackend
    from runtimes.config import ModelConfig
    from runtimes.sizes import SizeRange

    cuda = RecordingCuda()
    be = object.__new__(TensorRTBackend)
    be._cuda = cuda
    be._engines = {"dit": RecordingEngine(cuda, "dit", ["cond", "hidden"]),
                   "decoder": RecordingEngine(cuda, "decoder", ["v"])}
    be._slots, be._memory, be._last_out, be._last_key = {}, (0, 0), None, None
    be.cuda_graphs, be.image_size, be.batches = True, (64, 64), (1, 2, 4, 8, 16)
    be.null_class, be._c, be._d = 10, 3, 64
    be._model, be._size, be._bound = ModelConfig.from_dict(model), None, {}
    be.sizes = sizes or SizeRange.fixed((64, 64), 16)
    be.bind_graphs(be._model, {graph: e.outputs for graph, e in be._engines.items()})
    return be, cuda


class RecordingCudaEngine:
    """A deserialised engine as `tensorrt.ICudaEngine` describes its I/O."""

    def __init__(self, inputs, outputs, batches):
        self.io = [(n, "in") for n in inputs] + [(n, "out") for n in outputs]
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = len(batches)
        self._batches = batches

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return dict(self.io)[name]

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_profile_shape(self, name, p):
        n = self._batches[p]
        return (n, 3, 64, 64), (n, 3, 64, 64), (n, 3, 64, 64)


def engine_trt(inputs, outputs=("cond", "hidden"), batches=(1, 2)):
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in"),
                          DataType=SimpleNamespace(FLOAT="float32", INT64="int64"))
    runtime = SimpleNamespace(
        deserialize_cuda_engine=lambda data: RecordingCudaEngine(inputs, outputs, batches))
    return trt, runtime


def t2i_recording_backend():
    from runtimes.config import ModelConfig

    be, cuda = recording_backend()
    be._model = ModelConfig.from_dict(T2I)
    be._engines["text_embed"] = RecordingEngine(cuda, "text_embed", ["text_tokens"])
    be.bind_graphs(be._model, {graph: e.outputs for graph, e in be._engines.items()})
    return be, cuda
