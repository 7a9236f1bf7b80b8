"""OpenVINO backend: runs a bundle's existing ONNX graphs ("dit", "decoder", and the optional
"refresh", "decoder_cond" and "decoder_pixel").

Nothing is exported for OpenVINO: it reads the fp32 ONNX graphs the bundle already has, and
the precision is an *inference precision hint* (``fp32`` -> f32, ``bf16`` -> bf16 matrix work
with fp32 graph inputs and outputs). This module only translates numpy arrays into OpenVINO
calls; ``openvino`` is imported when the backend is created.

**Devices.** ``device="CPU"`` (the default), ``"GPU"`` (``"GPU.1"`` for a second one) or
``"NPU"``, by name. A device OpenVINO does not see is an error naming what it does see, and
the virtual devices AUTO / HETERO / MULTI are refused: they move work to another device
without saying so, and a benchmark or a parity figure would then describe the wrong hardware.
For the same reason ``bf16`` on a CPU without bf16 instructions (avx512_bf16 or amx_bf16;
OpenVINO lists them as the "BF16" capability) is an error rather than a silent fp32 run.
OpenVINO's CPU plugin chooses bf16 by itself on such CPUs when no hint is given, so ``fp32``
sets the f32 hint explicitly.

**Compiled-model cache.** Compiling a graph costs seconds at realistic sizes, so the compiled
model is exported once and imported afterwards. A blob is valid for one ONNX file (sha256),
one inference precision, one device (its name and capabilities) and one OpenVINO version; the
cache key is the sha256 of those fields (the TensorRT engines' keying,
`runtimes.backends.tensorrt_keys.key_digest`), and the blob lives at
``<cache_dir>/<graph>-<precision>-<key[:16]>/<graph>.blob`` next to a ``model.json`` that repeats
the fields and the blob's sha256. A changed graph, another device or another OpenVINO version
gives another key and compiles afresh; a blob whose sha256 does not match its record is
recompiled and replaced. ``cache_dir`` defaults to ``runtimes.cache.cache_dir("openvino")`` (
``~/.cache/deco/openvino``) so a bundle can stay read-only; ``cache_dir=False`` disables it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.backend import BackendError, HostArrays
from runtimes.backends.tensorrt_keys import key_digest
from runtimes.bundle import BundleError, Manifest, read_manifest
from runtimes.cache import cache_dir as default_cache_dir
from runtimes.fileio import atomic_write_bytes, atomic_write_text
from runtimes.graph_backend import GraphBackend
from runtimes.graphs import get_graph, graphs_for

__all__ = ["CACHE_KEY_VERSION", "DEVICES", "PRECISIONS", "OpenVinoBackend", "unavailable_reason"]

# Our precision -> (the ONNX artefact it reads, OpenVINO's inference precision hint).
PRECISIONS: dict[str, tuple[str, str]] = {"fp32": ("fp32", "f32"), "bf16": ("fp32", "bf16")}
DEVICES = ("CPU", "GPU", "NPU")
CACHE_KEY_VERSION = 1
MODEL_JSON = "model.json"
_VIRTUAL = ("AUTO", "HETERO", "MULTI", "BATCH")
_DEVICE_FIX = {
    "GPU": "install Intel's GPU compute runtime (intel-opencl-icd / Level Zero) and check that "
           "the user can open /dev/dri/renderD*",
    "NPU": "install the Intel NPU driver (intel-level-zero-npu) for this kernel",
}


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise BackendError(
            "the openvino backend needs OpenVINO: `pip install deco-export[openvino]`"
        ) from exc
    return openvino


def unavailable_reason(precision: str, options: Mapping[str, Any], gpu: bool) -> str | None:
    """The catalogue's probe: why OpenVINO cannot run ``precision`` here (library, precision,
    the CPU's bf16 instructions), or None."""
    from importlib.util import find_spec

    from runtimes.cpu import missing_bf16_reason

    if find_spec("openvino") is None:
        return "No module named 'openvino'; pip install 'deco-export[openvino]'"
    if precision not in PRECISIONS:
        return (f"OpenVINO runs {' or '.join(PRECISIONS)} (bf16 as an inference precision on "
                f"the fp32 graphs)")
    if precision == "bf16" and (missing := missing_bf16_reason()) is not None:
        return f"{missing}; the openvino backend refuses to run it"
    return None


def _check_device(core: Any, device: str) -> str:
    name = str(device).strip().upper()
    family = name.split(".", 1)[0]
    if family.split(":", 1)[0] in _VIRTUAL:
        raise BackendError(
            f"OpenVINO device {device!r} is a virtual device that can move work to another "
            f"device without saying so; name the device itself: one of {', '.join(DEVICES)}"
        )
    if family not in DEVICES:
        raise BackendError(
            f"unknown OpenVINO device {device!r}; use one of {', '.join(DEVICES)} (GPU.1 for a "
            f"second GPU)")
    available = list(core.available_devices)
    if name not in available and not (name == family and any(
            d.split(".", 1)[0] == family for d in available)):
        raise BackendError(
            f"OpenVINO sees no {name} device on this machine (it sees "
            f"{', '.join(available) or 'none'}); "
            f"{_DEVICE_FIX.get(family, 'check the installation')}, or use device='CPU'"
        )
    return name


class OpenVinoBackend(HostArrays, GraphBackend):
    """Runs an exported bundle's ONNX graphs with OpenVINO (the graph calls and capabilities
    follow from the graphs loaded: `runtimes.graph_backend`).

    bundle_dir: the bundle; manifest: its parsed manifest (read from ``bundle_dir`` if None).
    precision: "fp32" or "bf16" (the inference precision; both read the fp32 ONNX graphs).
    device: "CPU" (default), "GPU", "GPU.<n>" or "NPU".
    threads: OpenVINO's inference threads (None: its default, every core).
    cpu_pinning: pin the inference threads to cores (None: OpenVINO's default). On a machine
        whose cores are busy with other work a pinned thread cannot move off a busy core.
    cache_dir: where compiled models are cached (None: ``cache_dir("openvino")``; False: no cache).
    """

    thread_safe = True  # one infer request per graph and thread (see _request)

    runtime = "onnx"

    @staticmethod
    def artifact_precision(precision: str) -> str:
        """The precision of the bundle's ONNX artefacts that ``precision`` reads."""
        if precision not in PRECISIONS:
            raise BackendError(
                f"the openvino backend runs precision {' or '.join(PRECISIONS)}, not "
                f"{precision!r} (bf16 is an inference precision on the fp32 graphs)"
            )
        return PRECISIONS[precision][0]

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest | None = None,
        *,
        precision: str = "fp32",
        device: str = "CPU",
        threads: int | None = None,
        cpu_pinning: bool | None = None,
        cache_dir: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        ov = _import_openvino()
        source_precision = self.artifact_precision(precision)
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.bundle_dir)
        # The DiT's condition input: labels "y", or "text_tokens" for text-to-image.
        self.precision = precision
        self.openvino_version = str(ov.get_version())
        core = ov.Core()
        self.device = _check_device(core, device)
        self.device_name = str(core.get_property(self.device, "FULL_DEVICE_NAME"))
        self.capabilities = sorted(str(c) for c in core.get_property(
            self.device, "OPTIMIZATION_CAPABILITIES"))
        hint = PRECISIONS[precision][1]
        if precision == "bf16" and "BF16" not in self.capabilities:
            raise BackendError(
                f"{self.device} ({self.device_name}) has no bf16 instructions (OpenVINO lists "
                f"{', '.join(self.capabilities)}; a CPU needs avx512_bf16 or amx_bf16), so bf16 "
                f"would not run as asked; use precision='fp32'"
            )
        self.cache_dir: Path | None = (
            None if cache_dir is False
            else default_cache_dir("openvino") if cache_dir is None or cache_dir is True
            else Path(cache_dir))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint,
                                  "PERFORMANCE_HINT": "LATENCY"}
        if self.device == "CPU":
            config["NUM_STREAMS"] = 1
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            if cpu_pinning is not None:
                config["ENABLE_CPU_PINNING"] = bool(cpu_pinning)
        self.threads = threads
        self.config = config
        self.compile_seconds: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        # One infer request per graph and thread: a request owns its input and output tensors,
        # so threads sharing one would overwrite each other's images. The compiled models are
        # thread-safe and make each thread's requests on its first call.
        self._models: dict[str, Any] = {}
        self._requests: dict[str, Any] = {}
        self._local = threading.local()
        self._local.requests = self._requests
        self._outputs: dict[str, dict[str, Any]] = {}
        for graph, record in graphs_for(self.manifest.model).items():
            art = self.manifest.get_artifact("onnx", graph, source_precision)
            if art is None:
                if not record.required:
                    continue
                self.manifest.find_artifact("onnx", graph, source_precision)  # raises, with fix
                continue
            path = self.bundle_dir / art.file
            if not path.is_file():
                raise BundleError(f"{path}: missing; restore it or export the bundle again")
            compiled = self._compiled(core, graph, path, art.sha256)
            self._check_compiled(compiled, graph, art.file, hint)
            self._outputs[graph] = {o.get_any_name(): o for o in compiled.outputs}
            self._models[graph] = compiled
            self._requests[graph] = compiled.create_infer_request()
        self.bind_graphs(self.manifest.model, self._outputs)

    # -- compiled-model cache -----------------------------------------------------------------

    def cache_fields(self, graph: str, onnx_sha256: str) -> dict[str, Any]:
        """What a compiled blob of ``graph`` depends on; its cache key is their sha256."""
        return {
            "key_version": CACHE_KEY_VERSION,
            "graph": graph,
            "precision": self.precision,
            "onnx_sha256": onnx_sha256,
            "device": self.device,
            "device_name": self.device_name,
            "capabilities": self.capabilities,
            "openvino": self.openvino_version,
            "config": {k: self.config[k] for k in sorted(self.config)
                       if k not in ("INFERENCE_NUM_THREADS", "ENABLE_CPU_PINNING")},
        }

    def cache_path(self, graph: str, onnx_sha256: str) -> Path | None:
        """The blob's path for ``graph`` (None when caching is off)."""
        if self.cache_dir is None:
            return None
        key = key_digest(self.cache_fields(graph, onnx_sha256))
        return self.cache_dir / f"{graph}-{self.precision}-{key[:16]}" / f"{graph}.blob"

    def _compiled(self, core: Any, graph: str, path: Path, onnx_sha256: str) -> Any:
        """The compiled graph: imported from the cache when a matching blob is there, else
        compiled from the ONNX file (and then stored in the cache)."""
        started = time.perf_counter()
        blob_path = self.cache_path(graph, onnx_sha256)
        if blob_path is not None and blob_path.is_file():
            data = self._cached_blob(blob_path, graph, onnx_sha256)
            if data is not None:
                try:
                    compiled = core.import_model(io.BytesIO(data), self.device, self.config)
                except RuntimeError:
                    compiled = None  # an unreadable blob is rebuilt below
                if compiled is not None:
                    self.cache_hits[graph] = True
                    self.compile_seconds[graph] = time.perf_counter() - started
                    return compiled
        try:
            compiled = core.compile_model(core.read_model(str(path)), self.device, self.config)
        except RuntimeError as exc:
            raise BackendError(f"{path.name}: OpenVINO cannot compile it for {self.device}: "
                               f"{str(exc).strip().splitlines()[0]}") from exc
        self.cache_hits[graph] = False
        self.compile_seconds[graph] = time.perf_counter() - started
        if blob_path is not None:
            self._store(compiled, blob_path, graph, onnx_sha256)
        return compiled

    def _cached_blob(self, blob_path: Path, graph: str, onnx_sha256: str) -> bytes | None:
        """The blob's bytes when its ``model.json`` names exactly this key and its sha256."""
        try:
            info = json.loads((blob_path.parent / MODEL_JSON).read_text(encoding="utf-8"))
            data = blob_path.read_bytes()
        except (OSError, json.JSONDecodeError):
            return None
        fields = self.cache_fields(graph, onnx_sha256)
        if info.get("key") != fields or info.get("cache_key") != key_digest(fields):
            return None
        if info.get("blob_sha256") != hashlib.sha256(data).hexdigest():
            return None
        return data

    def _store(self, compiled: Any, blob_path: Path, graph: str, onnx_sha256: str) -> None:
        stream = compiled.export_model()
        data = stream.getvalue() if hasattr(stream, "getvalue") else bytes(stream)
        fields = self.cache_fields(graph, onnx_sha256)
        try:
            atomic_write_bytes(blob_path, data)
            atomic_write_text(blob_path.parent / MODEL_JSON, json.dumps(
                {"key": fields, "cache_key": key_digest(fields),
                 "blob_sha256": hashlib.sha256(data).hexdigest(), "blob_bytes": len(data)},
                indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise BackendError(
                f"cannot write the OpenVINO model cache {blob_path.parent} ({exc.strerror}); "
                f"pass cache_dir= a writable folder, or cache_dir=False"
            ) from exc

    # -- checks -------------------------------------------------------------------------------

    def _check_compiled(self, compiled: Any, graph: str, file: str, hint: str) -> None:
        devices = [str(d) for d in compiled.get_property("EXECUTION_DEVICES")]
        if any(d.split(".", 1)[0] != self.device.split(".", 1)[0] for d in devices):
            raise BackendError(
                f"{file}: asked for {self.device} but OpenVINO runs it on {', '.join(devices)}")
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        got = str(got.get_type_name() if hasattr(got, "get_type_name") else got)
        if got != hint:
            raise BackendError(
                f"{file}: asked for {self.precision} (OpenVINO {hint}) but OpenVINO compiled it "
                f"for {got} on {self.device}, which does not run {hint}; choose the other "
                f"precision")
        spec = get_graph(graph, self.manifest.model)
        want_in, want_out, need_out = spec.input_names, spec.output_names, spec.required_outputs
        have_in = {i.get_any_name() for i in compiled.inputs}
        have_out = {o.get_any_name() for o in compiled.outputs}
        if have_in != set(want_in) or not set(need_out) <= have_out:
            raise BackendError(
                f"{file}: the {graph} graph has inputs {sorted(have_in)} and outputs "
                f"{sorted(have_out)}, expected inputs {list(want_in)} and outputs "
                f"{list(want_out)}; export it again with the standard names")

    # -- Backend protocol ---------------------------------------------------------------------

    def _request(self, graph: str) -> Any:
        """This thread's infer request of ``graph`` (made on the thread's first call)."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(graph)
        if request is None:
            if graph not in self._models:
                raise BackendError(f"the OpenVINO backend has no '{graph}' graph (or is closed)")
            request = requests[graph] = self._models[graph].create_infer_request()
        return request

    def _run(self, graph: str, output: str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        result = self._request(graph).infer(
            {name: np.ascontiguousarray(value) for name, value in feeds.items()})
        # A copy: an output may outlive later calls of this graph's infer request (the text
        # tokens live for a whole generation, a cached condition for several steps).
        return np.array(result[self._outputs[graph][output]])

    def close(self) -> None:
        """Drop the infer requests (and with them the compiled models)."""
        self._requests.clear()
        self._models.clear()

    def describe(self) -> dict[str, Any]:
        """What runs where: for logs and benchmark reports."""
        return {
            "backend": "openvino",
            "precision": self.precision,
            "device": self.device,
            "device_name": self.device_name,
            "openvino": self.openvino_version,
            "threads": self.threads,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "cache_hits": dict(self.cache_hits),
            "compile_seconds": {k: round(v, 3) for k, v in self.compile_seconds.items()},
            "supports_refresh": self.supports_refresh,
            "supports_decoder_split": self.supports_decoder_split,
        }
