"""The backend catalogue: one `BackendEntry` per backend, the only place a backend is described.

Everything that names backends reads this: ``runtimes.load`` (which factory, which artefacts it
verifies), ``deco sample`` (which backends run a bundle, which command-line options a backend
takes), ``deco bench`` (its rows, their load options and why one cannot run here), ``deco
validate --backend``, the exporters' end-to-end gates (the manifest runtime a backend reads)
and the CLI's advice when a library is missing (the pip extra). A new backend is one entry:
``register(BackendEntry(...))`` (or ``runtimes.register_backend``), or an entry point of the
``runtimes.backends`` group whose function registers it.

Entries name their factory and their availability probe as lazy ``"module:attribute"``
strings, so reading the catalogue imports no runtime library; the probe lives in the backend's
own module, next to the code that would fail.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendEntry",
    "BenchRow",
    "Probe",
    "entries",
    "entry",
    "extra_for",
    "load_attribute",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "runtimes.backends"

#: ``probe(precision, options, gpu)``: why the backend cannot run ``precision`` here with the
#: load ``options`` (a bench row's, e.g. its providers), or None when a cheap check finds no
#: reason. ``gpu``: the caller found a CUDA GPU.
Probe = Callable[[str, Mapping[str, Any], bool], "str | None"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class BenchRow:
    """One row kind `deco bench` runs a backend as.

    name: the row's name in the report (``onnxruntime-cpu``); description: its line in the
    table's legend; options: what the row passes to the backend's factory (e.g. its ONNX
    Runtime providers); on_cpu: its matrix work runs on this machine's CPU, so the CPU's
    measured GEMM peak bounds it; aliases: other names ``--backends`` accepts for this row
    alone; quick: runs under ``deco bench --quick`` (False for a row whose build time would
    dominate a quick look, torch.compile's).
    """

    name: str
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    on_cpu: bool = False
    aliases: tuple[str, ...] = ()
    quick: bool = True


@dataclass(frozen=True)
class BackendEntry:
    """What the package knows about one backend, in one place.

    name: the ``runtimes.load(..., backend=name)`` name; aliases: other names it answers to.
    factory: the backend's factory, or a lazy ``"module:Attribute"`` string; called as
        ``factory(bundle_dir, manifest, precision=..., **options)``.
    runtime: the manifest runtime whose artefacts it reads ("onnx", "coreml", "tensorrt"), so
        ``load`` verifies only those; None verifies the whole bundle.
    precisions: the precisions it runs (None: whatever the caller asks; the factory decides).
    libraries: the import names of its runtime library; extra: the pip extra installing them.
    probe: its availability probe (`Probe`, or a lazy ``"module:function"``).
    source: "bundle" (runs a bundle's artefacts) or "checkpoint" (runs the checkpoint a bundle
        names, or a model in memory).
    cli_options: `deco sample` option -> the factory option it sets (``device`` for OpenVINO).
    cli_defaults: factory options the command line and the bench pass on shared machines (ONNX
        Runtime's idle threads sleep instead of spinning).
    bench_threads: the factory option that takes the bench's ``--threads`` (None: none).
    bench_rows: the rows `deco bench` runs it as (None: one row named after it, on the
        bundle's artefacts).
    description: one line for listings.
    """

    name: str
    factory: str | Callable[..., Any]
    runtime: str | None = None
    precisions: tuple[str, ...] | None = None
    libraries: tuple[str, ...] = ()
    extra: str | None = None
    probe: str | Probe | None = None
    source: str = "bundle"
    aliases: tuple[str, ...] = ()
    cli_options: Mapping[str, str] = field(default_factory=dict)
    cli_defaults: Mapping[str, Any] = field(default_factory=dict)
    bench_threads: str | None = None
    bench_rows: tuple[BenchRow, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a backend name must be a non-empty string")
        if self.source not in ("bundle", "checkpoint"):
            raise ValueError(f"backend {self.name!r}: source must be 'bundle' or 'checkpoint'")

    def load_factory(self) -> Callable[..., Any]:
        """The factory, its module imported now (an ImportError names the missing library)."""
        if callable(self.factory):
            return self.factory
        module_name = self.factory.partition(":")[0]
        try:
            return load_attribute(self.factory)  # type: ignore[no-any-return]
        except ImportError as exc:
            raise ImportError(
                f"backend {self.name!r} needs {module_name}, which cannot be imported ({exc}); "
                f"install its runtime library"
            ) from exc

    def artifact_precision(self, precision: str) -> str:
        """The precision of the artefacts this backend reads to run ``precision``: a factory
        whose precisions read another precision's artefacts (OpenVINO's bf16 is an inference
        precision on the fp32 graphs) says so with ``artifact_precision(precision)``."""
        reads = getattr(self.load_factory(), "artifact_precision", None)
        return str(reads(precision)) if callable(reads) else precision

    def rows(self) -> tuple[BenchRow, ...]:
        """The bench rows of this backend."""
        if self.bench_rows is not None:
            return self.bench_rows
        return (BenchRow(self.name, self.description or f"the {self.name} backend"),)

    def unavailable_reason(self, precision: str, options: Mapping[str, Any] = _EMPTY,
                           gpu: bool = False) -> str | None:
        """Why this backend cannot run ``precision`` here (its probe, then its precisions), or
        None."""
        if self.probe is not None:
            probe = self.probe if callable(self.probe) else load_attribute(self.probe)
            reason: str | None = probe(precision, options, gpu)
            if reason is not None:
                return reason
        if self.precisions is not None and precision not in self.precisions:
            return (f"the {self.name} backend runs {', '.join(self.precisions)}, not "
                    f"{precision}")
        return None


_CATALOGUE: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> BackendEntry:
    """Add (or replace) ``entry``: every reader of the catalogue sees it from now on."""
    if not isinstance(entry, BackendEntry):
        raise TypeError("register takes a BackendEntry")
    _CATALOGUE[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove backend ``name`` from the catalogue (a test's throw-away backend)."""
    _CATALOGUE.pop(name, None)


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {e.name: e for e in entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_points(only: str | None = None) -> None:
    """Call the registration functions other packages offer (those not registered yet)."""
    for name, point in _entry_points().items():
        if name not in _CATALOGUE and (only is None or name == only):
            point.load()()


def entries() -> dict[str, BackendEntry]:
    """Every backend: the shipped ones, those registered, and those other packages offer
    through the ``runtimes.backends`` entry points (listed does not mean installed)."""
    _load_entry_points()
    return dict(_CATALOGUE)


def entry(name: str) -> BackendEntry:
    """The entry of backend ``name`` (or one of its aliases)."""
    key = name.strip() if isinstance(name, str) else name
    if key not in _CATALOGUE:
        for candidate in _CATALOGUE.values():
            if key in candidate.aliases:
                return candidate
        _load_entry_points(key)
    if key not in _CATALOGUE:
        raise ValueError(
            f"unknown backend {name!r}: registered backends are {', '.join(sorted(entries()))}"
            f" (deco-export[torch] adds 'torch' and 'torch-cuda')"
        )
    return _CATALOGUE[key]


def load_attribute(target: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (the module imported now)."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def extra_for(library: str | None) -> str | None:
    """The pip extra of the backend whose runtime library ``library`` (an import name) is,
    or None when no backend names it."""
    top = (library or "").split(".")[0]
    for candidate in entries().values():
        if top in candidate.libraries and candidate.extra:
            return candidate.extra
    return None


# The shipped runtime backends (in the bench's row order); each module holds its class and its
# probe.
register(BackendEntry(
    "onnxruntime", "runtimes.backends.onnxruntime:OnnxRuntimeBackend", runtime="onnx",
    precisions=("fp32", "fp16", "int8"), libraries=("onnxruntime",), extra="onnx",
    probe="runtimes.backends.onnxruntime:unavailable_reason", aliases=("ort", "onnx"),
    cli_defaults=MappingProxyType({"allow_spinning": False}),
    bench_threads="intra_op_threads",
    bench_rows=tuple(
        BenchRow(f"onnxruntime-{short}", f"ONNX Runtime, {full}",
                 MappingProxyType({"providers": [short]}), on_cpu=short == "cpu",
                 aliases=(f"ort-{short}",) if short in ("cpu", "cuda") else ())
        for short, full in (("cpu", "CPUExecutionProvider"), ("cuda", "CUDAExecutionProvider"),
                            ("tensorrt", "TensorrtExecutionProvider"),
                            ("coreml", "CoreMLExecutionProvider"))),
    description="ONNX Runtime on the ONNX graphs"))
register(BackendEntry(
    "openvino", "runtimes.backends.openvino:OpenVinoBackend", runtime="onnx",
    precisions=("fp32", "bf16"), libraries=("openvino",), extra="openvino",
    probe="runtimes.backends.openvino:unavailable_reason", aliases=("ov",),
    cli_options=MappingProxyType({"device": "device"}), bench_threads="threads",
    bench_rows=(BenchRow("openvino-cpu",
                         "OpenVINO CPU on the fp32 ONNX graphs (bf16: inference precision)",
                         MappingProxyType({"cpu_pinning": False}), on_cpu=True),),
    description="OpenVINO on the fp32 ONNX graphs"))
register(BackendEntry(
    "tensorrt", "runtimes.backends.tensorrt:TensorRTBackend", runtime="tensorrt",
    libraries=("tensorrt",), extra="tensorrt",
    probe="runtimes.backends.tensorrt:unavailable_reason", aliases=("trt",),
    bench_rows=(BenchRow("tensorrt", "TensorRT engines, whole-step CUDA graphs"),),
    description="TensorRT engines"))
register(BackendEntry(
    "coreml", "runtimes.backends.coreml:CoreMLBackend", runtime="coreml",
    libraries=("coremltools",), extra="coreml",
    probe="runtimes.backends.coreml:unavailable_reason",
    bench_rows=(BenchRow("coreml", "Core ML packages"),), description="Core ML packages"))
