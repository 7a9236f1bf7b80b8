"""ONNX Runtime backend: runs a bundle's "dit", "decoder" (and optional "refresh",
"decoder_cond" and "decoder_pixel") graphs.

Providers are chosen by short name ("cpu", "cuda", "tensorrt", "coreml") or full ORT name,
optionally as (name, options) pairs. ONNX Runtime silently falls back to the CPU when a provider
cannot load (missing CUDA/cuDNN/TensorRT libraries); this backend compares
``session.get_providers()`` with the request after creating each session and raises instead.

Native arrays:

- On the CPU (and Core ML, which reads host memory) they are plain numpy arrays and graphs run
  through ``session.run``.
- On CUDA / TensorRT ("device-resident" mode) they are `OrtArray` objects wrapping an
  ``OrtValue`` in device memory. Graphs run with IO binding, outputs are allocated on the
  device, and the sampler's arithmetic (+, -, * and batch slicing / concatenation) runs as tiny
  one-node ORT graphs on the same provider, so x, v and the DiT condition stay on the GPU for
  the whole loop and cross PCIe only at the start and the end. Each ORT call still synchronises
  its stream when it returns (ORT's default), so this removes copies, not host syncs; a
  whole-step CUDA graph is the tool for the latter. The mode can be forced on the CPU
  (``device_resident=True``), which is how it is tested without a GPU.

Graph inputs and outputs are float32 / int64 whatever the artifact's precision (fp16 graphs cast
inside), so this backend never casts. ``onnxruntime`` is imported when the backend is created.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.backend import BackendError
from runtimes.bundle import ONNX_PRECISIONS, BundleError, Manifest, read_manifest
from runtimes.config import ModelConfig
from runtimes.graph_backend import GraphBackend
from runtimes.graphs import get_graph, graphs_for

__all__ = ["PROVIDER_NAMES", "OnnxRuntimeBackend", "OrtArray", "resolve_providers",
           "unavailable_reason"]

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}
_DEVICE_OF = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
}
_FIX = {
    "CUDAExecutionProvider": (
        "install onnxruntime-gpu (never alongside onnxruntime: they own the same package) with "
        "the CUDA and cuDNN versions it was built for, and check that `nvidia-smi` sees a GPU"
    ),
    "TensorrtExecutionProvider": (
        "install onnxruntime-gpu and put the TensorRT libraries (libnvinfer, "
        "libnvonnxparser) of the version it expects on the library path"
    ),
    "CoreMLExecutionProvider": "the Core ML provider exists only in macOS builds of onnxruntime",
}
_IO_DTYPES = ("float32", "int64")
# What a missing provider needs, in a benchmark's one-line reason.
_PROBE_HINT = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (instead of onnxruntime) on a machine with "
                             "an NVIDIA GPU",
    "TensorrtExecutionProvider": "install onnxruntime-gpu and the TensorRT libraries",
    "CoreMLExecutionProvider": "only macOS builds of onnxruntime have it",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(
            "the onnxruntime backend needs onnxruntime: `pip install onnxruntime` (CPU) or "
            "`pip install onnxruntime-gpu` (CUDA/TensorRT)"
        ) from exc
    return onnxruntime


def unavailable_reason(precision: str, options: Mapping[str, Any], gpu: bool) -> str | None:
    """The catalogue's probe: why ONNX Runtime cannot run ``precision`` on the first of the
    ``providers`` option here (library, provider, precision), or None."""
    from importlib.util import find_spec

    if find_spec("onnxruntime") is None:
        return "No module named 'onnxruntime'; pip install onnxruntime"
    import onnxruntime

    full = resolve_providers(options.get("providers"))[0][0]
    offered = onnxruntime.get_available_providers()
    if full not in offered:
        return (f"{full} not available (this onnxruntime {onnxruntime.__version__} offers "
                f"{', '.join(offered)}); {_PROBE_HINT.get(full, '')}").rstrip("; ")
    if precision not in ONNX_PRECISIONS:
        return f"ONNX export writes {', '.join(ONNX_PRECISIONS)} graphs only"
    return None


def resolve_providers(
    providers: str | Sequence[str | tuple[str, Mapping[str, Any]]] | None,
) -> list[tuple[str, dict[str, Any]]]:
    """Short or full provider names (optionally with options) -> [(ORT name, options)]."""
    if providers is None:
        providers = ["cpu"]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    out: list[tuple[str, dict[str, Any]]] = []
    for p in providers:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        full = PROVIDER_NAMES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            raise BackendError(
                f"unknown ONNX Runtime provider {name!r}: use one of "
                f"{', '.join(sorted(set(PROVIDER_NAMES)))} or a full ORT provider name"
            )
        out.append((full, opts))
    if not out:
        raise BackendError("no ONNX Runtime provider given; use e.g. providers=['cpu']")
    return out


# ---------------------------------------------------------------------------------------------
# Device-resident arrays: a minimal ONNX protobuf writer for one-node graphs, so no `onnx`
# package is needed at run time.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes | str | int) -> bytes:
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


_ELEM = {"float32": 1, "int64": 7}


def _value_info(name: str, dtype: str, rank: int) -> bytes:
    # ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: Tensor{elem_type=1, shape=2}}};
    # every dimension symbolic (TensorShapeProto.dim=1: Dimension{dim_param=2}).
    shape = b"".join(_field(1, _field(2, f"{name}_{i}")) for i in range(rank))
    tensor_type = _field(1, _ELEM[dtype]) + _field(2, shape)
    return _field(1, name) + _field(2, _field(1, tensor_type))


def _one_node_model(
    op: str,
    inputs: Sequence[tuple[str, str, int]],
    out_rank: int,
    dtype: str = "float32",
    int_attrs: Mapping[str, int] | None = None,
) -> bytes:
    """Serialized ModelProto (IR 8, opset 13) computing ``out = op(*inputs)``; inputs are
    (name, dtype, rank) with symbolic dimensions."""
    attrs = b"".join(
        _field(5, _field(1, k) + _field(20, 2) + _field(3, v)) for k, v in (int_attrs or {}).items()
    )
    node = b"".join(_field(1, n) for n, _, _ in inputs) + _field(2, "out") + _field(4, op)
    graph = (
        _field(1, node + attrs)
        + _field(2, f"deco_{op.lower()}")
        + b"".join(_field(11, _value_info(n, t, r)) for n, t, r in inputs)
        + _field(12, _value_info("out", dtype, out_rank))
    )
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(2, "deco-runtimes") + _field(8, opset) + _field(7, graph)


# How ONNX Runtime words a failed allocation (its arena, the CPU allocator, CUDA): not a damaged
# bundle, so not "run deco validate".
_OUT_OF_MEMORY = ("failed to allocate memory", "bad_alloc", "out of memory")


class _DeviceOps:
    """One-node ORT sessions that do the sampler's arithmetic on device-resident OrtValues."""

    def __init__(self, ort: Any, providers: list[tuple[str, dict[str, Any]]], device: str,
                 device_id: int, threads: int | None) -> None:
        self.ort = ort
        self.device = device
        self.device_id = device_id
        self.providers = [(n, o) for n, o in providers]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self._so = so
        self._sessions: dict[Any, Any] = {}
        self._scalars: dict[float, Any] = {}
        self._ints: dict[tuple[int, ...], Any] = {}

    def _session(self, key: Any, build: Callable[[], bytes]) -> Any:
        """The session for ``key``, created from ``build()`` on first use."""
        sess = self._sessions.get(key)
        if sess is None:
            sess = self.ort.InferenceSession(
                build(), sess_options=self._so,
                providers=[n for n, _ in self.providers],
                provider_options=[o for _, o in self.providers],
            )
            self._sessions[key] = sess
        return sess

    def _run(self, sess: Any, feeds: Mapping[str, Any]) -> Any:
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("out", self.device, self.device_id)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def value(self, a: Any) -> Any:
        """OrtValue for an OrtArray, a numpy array or a Python scalar (scalars cached)."""
        if isinstance(a, OrtArray):
            return a.value
        if isinstance(a, (int, float, np.floating, np.integer)) and not isinstance(a, bool):
            key = float(a)
            v = self._scalars.get(key)
            if v is None:
                v = self.ort.OrtValue.ortvalue_from_numpy(
                    np.array(key, dtype=np.float32), self.device, self.device_id
                )
                self._scalars[key] = v
            return v
        return self.ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(a), self.device, self.device_id
        )

    def binary(self, op: str, a: Any, b: Any) -> OrtArray:
        va, vb = self.value(a), self.value(b)
        ra, rb = len(va.shape()), len(vb.shape())
        key = (op, ra, rb)
        sess = self._session(key, lambda: _one_node_model(
            op, [("a", "float32", ra), ("b", "float32", rb)], max(ra, rb)
        ))
        return OrtArray(self._run(sess, {"a": va, "b": vb}), self)

    def _int64(self, values: tuple[int, ...]) -> Any:
        v = self._ints.get(values)
        if v is None:  # Slice reads starts/ends/axes on the host in every provider
            v = self.ort.OrtValue.ortvalue_from_numpy(np.array(values, dtype=np.int64))
            self._ints[values] = v
        return v

    def slice0(self, a: OrtArray, start: int, stop: int) -> OrtArray:
        rank = len(a.shape)
        key = ("Slice", rank)
        sess = self._session(key, lambda: _one_node_model(
            "Slice",
            [("data", "float32", rank), ("starts", "int64", 1), ("ends", "int64", 1),
             ("axes", "int64", 1)],
            rank,
        ))
        feeds = {
            "data": a.value,
            "starts": self._int64((start,)),
            "ends": self._int64((stop,)),
            "axes": self._int64((0,)),
        }
        return OrtArray(self._run(sess, feeds), self)

    def concat0(self, arrays: Sequence[Any]) -> OrtArray:
        names = [f"in{i}" for i in range(len(arrays))]
        values = [self.value(a) for a in arrays]
        rank = len(values[0].shape())
        key = ("Concat", len(arrays), rank)
        sess = self._session(key, lambda: _one_node_model(
            "Concat", [(n, "float32", rank) for n in names], rank, int_attrs={"axis": 0}
        ))
        feeds = dict(zip(names, values, strict=True))
        return OrtArray(self._run(sess, feeds), self)


class OrtArray:
    """A float32 OrtValue on the backend's device with the operations the sampler uses.

    ``+``, ``-``, ``*`` (with another OrtArray or a Python float), ``a[i:j]`` along the batch
    axis, and ``numpy()``. Each operation is one tiny ORT graph on the same provider.
    """

    __slots__ = ("_ops", "value")
    __array_priority__ = 1000  # numpy scalars on the left defer to our reflected operators

    def __init__(self, value: Any, ops: _DeviceOps) -> None:
        self.value = value
        self._ops = ops

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        return np.asarray(self.value.numpy())

    def __add__(self, other: Any) -> OrtArray:
        return self._ops.binary("Add", self, other)

    def __radd__(self, other: Any) -> OrtArray:
        return self._ops.binary("Add", other, self)

    def __sub__(self, other: Any) -> OrtArray:
        return self._ops.binary("Sub", self, other)

    def __rsub__(self, other: Any) -> OrtArray:
        return self._ops.binary("Sub", other, self)

    def __mul__(self, other: Any) -> OrtArray:
        return self._ops.binary("Mul", self, other)

    def __rmul__(self, other: Any) -> OrtArray:
        return self._ops.binary("Mul", other, self)

    def __getitem__(self, key: Any) -> OrtArray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("OrtArray supports only contiguous batch slices such as a[:B]")
        start, stop, _ = key.indices(self.shape[0])
        return self._ops.slice0(self, start, stop)

    def __repr__(self) -> str:
        return f"OrtArray(shape={self.shape}, device={self.value.device_name()})"


# ---------------------------------------------------------------------------------------------


class OnnxRuntimeBackend(GraphBackend):
    """Runs an exported bundle's ONNX graphs with ONNX Runtime (the graph calls and
    capabilities follow from the graphs loaded: `runtimes.graph_backend`).

    bundle_dir: the bundle; manifest: its parsed manifest (read from ``bundle_dir`` if None).
    precision: which exported variant ("fp32", "fp16", ...).
    providers: short names ("cpu", "cuda", "tensorrt", "coreml"), full ORT names, or
        (name, options) pairs, in priority order. Default: CPU.
    intra_op_threads / inter_op_threads: ORT thread pools (None: ORT's default).
    allow_spinning: False makes idle pool threads sleep instead of spin; on a machine whose
        cores are busy with other work, spinning threads steal the cores the pool waits for and
        a small graph can run several times slower (docs/benchmarks.md). None: ORT's default.
    session_options: a ready ``onnxruntime.SessionOptions`` (the thread options then apply on
        top of it).
    device_resident: keep arrays on the device between steps (default: on for CUDA/TensorRT).
    device_id: GPU index for device-resident arrays.
    """

    thread_safe = True  # ORT sessions are re-entrant; bindings are made per call

    runtime = "onnx"

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest | None = None,
        *,
        precision: str = "fp32",
        providers: str | Sequence[str | tuple[str, Mapping[str, Any]]] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        allow_spinning: bool | None = None,
        session_options: Any = None,
        device_resident: bool | None = None,
        device_id: int = 0,
    ) -> None:
        ort = _import_ort()
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.bundle_dir)
        self.precision = precision
        self.providers = resolve_providers(providers)
        available = ort.get_available_providers()
        for name, _ in self.providers:
            if name not in available:
                raise BackendError(
                    f"{name} is not in this onnxruntime build (it offers {', '.join(available)}); "
                    f"{_FIX.get(name, 'install an onnxruntime build that has it')}"
                )
        so = session_options if session_options is not None else ort.SessionOptions()
        if session_options is None:
            so.log_severity_level = 3
        if intra_op_threads:
            so.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads:
            so.inter_op_num_threads = int(inter_op_threads)
        if allow_spinning is not None:
            flag = "1" if allow_spinning else "0"
            so.add_session_config_entry("session.intra_op.allow_spinning", flag)
            so.add_session_config_entry("session.inter_op.allow_spinning", flag)
        self._sessions: dict[str, Any] = {}
        for graph, record in graphs_for(self.manifest.model).items():
            art = self.manifest.get_artifact("onnx", graph, precision)
            if art is None:
                if not record.required:
                    continue
                self.manifest.find_artifact("onnx", graph, precision)  # raises with the fix
                continue
            for spec in (*art.inputs, *art.outputs):
                if spec.dtype not in _IO_DTYPES:
                    raise BundleError(
                        f"{art.file}: {spec.name} is {spec.dtype}, but graph inputs/outputs must "
                        f"be float32 or int64 (reduced precision belongs inside the graph); "
                        f"export the bundle again"
                    )
            path = self.bundle_dir / art.file
            if not path.is_file():
                raise BundleError(f"{path}: missing; restore it or export the bundle again")
            try:
                sess = ort.InferenceSession(
                    str(path),
                    sess_options=so,
                    providers=[n for n, _ in self.providers],
                    provider_options=[o for _, o in self.providers],
                )
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                raise BackendError(f"{art.file}: ONNX Runtime cannot load it: {exc}") from exc
            self._check_fallback(sess, art.file)
            self._check_io(sess, graph, art.file, self.manifest.model)
            self._check_shapes(sess, art)
            self._sessions[graph] = sess
        self.bind_graphs(self.manifest.model, {
            graph: [o.name for o in sess.get_outputs()] for graph, sess in self._sessions.items()})
        first = self.providers[0][0]
        self.device = _DEVICE_OF.get(first, "cpu")
        self.device_id = int(device_id)
        self.device_resident = (self.device != "cpu") if device_resident is None else bool(
            device_resident
        )
        self._ops = (
            _DeviceOps(ort, self.providers, self.device, self.device_id, intra_op_threads)
            if self.device_resident
            else None
        )

    # -- checks -----------------------------------------------------------------------------

    def _check_fallback(self, sess: Any, file: str) -> None:
        got = sess.get_providers()
        missing = [name for name, _ in self.providers if name not in got]
        if missing:
            fixes = "; ".join(_FIX.get(m, f"check the {m} installation") for m in missing)
            raise BackendError(
                f"{file}: asked for {', '.join(missing)} but ONNX Runtime fell back to "
                f"{', '.join(got)} (it does so silently when a provider's libraries fail to "
                f"load); {fixes}"
            )

    @staticmethod
    def _check_io(sess: Any, graph: str, file: str, model: ModelConfig | None = None) -> None:
        """The graph's I/O names against its record for this model's family."""
        spec = get_graph(graph, model)
        want_in, want_out, need_out = spec.input_names, spec.output_names, spec.required_outputs
        have_in = [i.name for i in sess.get_inputs()]
        have_out = [o.name for o in sess.get_outputs()]
        if set(have_in) != set(want_in) or not set(need_out) <= set(have_out):
            raise BackendError(
                f"{file}: the {graph} graph has inputs {have_in} and outputs {have_out}, "
                f"expected inputs {list(want_in)} and outputs {list(want_out)}; export it again "
                f"with the standard names"
            )

    @staticmethod
    def _check_shapes(sess: Any, art: Any) -> None:
        """The graph's fixed dimensions must be the manifest's: a file swapped in from another
        model (with a re-hashed manifest) fails here, by name, not deep inside a run."""
        for kind, have, specs in (("input", sess.get_inputs(), art.inputs),
                                  ("output", sess.get_outputs(), art.outputs)):
            want = {s.name: s.shape for s in specs}
            for node in have:
                if node.name not in want:
                    continue
                shape = list(node.shape)
                expected = want[node.name]
                fixed = [
                    (i, a, b) for i, (a, b) in enumerate(zip(shape, expected, strict=False))
                    if isinstance(a, int) and isinstance(b, int) and a != b
                ]
                if len(shape) != len(expected) or fixed:
                    raise BackendError(
                        f"{art.file}: {kind} {node.name} has shape {shape} in the graph but "
                        f"{expected} in manifest.json, so the file belongs to another model; "
                        f"export the bundle again"
                    )

    # -- Backend protocol ---------------------------------------------------------------------

    def _run(self, graph: str, output: str, feeds: Mapping[str, Any]) -> Any:
        sess = self._sessions[graph]
        if self._ops is None:
            try:
                return sess.run([output], dict(feeds))[0]
            except Exception as exc:  # ORT's InvalidArgument / Fail carry C++ context lines
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if any(word in str(exc).lower() for word in _OUT_OF_MEMORY):
                    raise BackendError(
                        f"the {graph} graph ran out of memory in ONNX Runtime ({first[:160]}); "
                        "generate fewer or smaller images at once, or free memory"
                    ) from exc
                raise BackendError(
                    f"the {graph} graph failed in ONNX Runtime ({first}); run `deco validate` on "
                    "the bundle, or export it again"
                ) from exc
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, self._ops.value(value))
        binding.bind_output(output, self.device, self.device_id)
        sess.run_with_iobinding(binding)
        return OrtArray(binding.get_outputs()[0], self._ops)

    def from_numpy(self, a: np.ndarray) -> Any:
        a = np.ascontiguousarray(a)
        if self._ops is None:
            return a
        return OrtArray(
            self._ops.ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id), self._ops
        )

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.numpy() if isinstance(a, OrtArray) else np.asarray(a)

    def concat(self, arrays: Sequence[Any]) -> Any:
        if self._ops is None:
            return np.concatenate(arrays, axis=0)
        return self._ops.concat0(arrays)

    def close(self) -> None:
        """Drop the sessions (and with them their device memory)."""
        self._sessions.clear()
        self._ops = None

    def describe(self) -> dict[str, Any]:
        """What runs where: for logs and benchmark reports."""
        return {
            "backend": "onnxruntime",
            "precision": self.precision,
            "providers": {g: s.get_providers() for g, s in self._sessions.items()},
            "device_resident": self.device_resident,
            "supports_refresh": self.supports_refresh,
            "supports_decoder_split": self.supports_decoder_split,
        }
