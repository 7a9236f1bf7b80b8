"""Core ML backend: runs a bundle's ``.mlpackage`` graphs with ``MLModel.predict`` (macOS only).

Arrays are numpy on the host (Core ML reads host memory and picks CPU, GPU or Neural Engine
per operation inside ``predict``). Graph inputs and outputs are float32, with int32 labels:
Core ML has no int64 inputs, so labels are cast here after a range check. A text-to-image
DiT takes the text features (B, L, C) float32 as ``text`` where a class-conditional one takes
``y`` (the model's graph record says which).

Batches: each package accepts the batch sizes it was exported with (``details.batch_sizes``
in the manifest, by default 1 and 2, the CFG pair). A larger batch is split into allowed
sizes, largest first (6 with sizes 1, 2, 4 runs as 4 + 2), and the outputs are joined.

Load times: ``MLModel(path)`` compiles an ``.mlpackage`` on every load, which dominates cold
starts (minutes for large models on the Neural Engine). The backend keeps the compiled
``.mlmodelc`` in a cache directory keyed by the package's sha256 and the compute units, and
later loads open it with ``CompiledMLModel``. ``load_times`` says, per graph, how long the load
took and whether it was "cold" (compiled now) or "warm" (from the cache).

Compute units: the manifest records the ones chosen at export (``details.compute_units``);
``compute_units=`` overrides them ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY"). fp16
packages keep fp32 islands (norms, RoPE, timestep features) that the Neural Engine cannot run;
for CPU_AND_NE, export with ``--fp32-islands none``.

The other route to Apple hardware is ONNX Runtime's Core ML execution provider, which
compiles the bundle's ONNX graphs to Core ML when the session is created:
``runtimes.load(bundle, backend="onnxruntime", providers=["coreml", "cpu"])``. It lives in the
ONNX Runtime backend (which refuses to fall back silently when the provider is missing) and
needs a macOS build of onnxruntime; this backend runs the packages ``deco export coreml`` made.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import staging
from runtimes.backend import BackendError, HostArrays
from runtimes.bundle import BundleError, Manifest, read_manifest, sha256_path
from runtimes.cache import cache_dir as default_cache_dir
from runtimes.config import ModelConfig
from runtimes.graph_backend import GraphBackend
from runtimes.graphs import get_graph, graphs_for

__all__ = [
    "COMPUTE_UNITS",
    "CoreMLBackend",
    "check_package_io",
    "measure_load_times",
    "require_macos",
    "split_batch",
    "unavailable_reason",
]

COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
INSTALL_HINT = "pip install 'deco-export[coreml]'"


def require_macos(platform: str | None = None) -> None:
    """Core ML runs models only on macOS; say so, and what to use instead."""
    platform = platform or sys.platform
    if platform != "darwin":
        raise BackendError(
            f"the coreml backend needs macOS: Core ML cannot run models on {platform} "
            "(coremltools there only converts and saves). Sample this bundle's ONNX graphs with "
            "--backend onnxruntime, or run on a Mac"
        )


def unavailable_reason(precision: str, options: Mapping[str, Any], gpu: bool) -> str | None:
    """The catalogue's probe: why Core ML cannot run here (macOS, coremltools), or None."""
    from importlib.util import find_spec

    platform = str(sys.platform)  # a string to the type checker on every OS
    if platform != "darwin":
        return (f"predict needs macOS: Core ML runs models only on macOS (this is "
                f"{platform}; coremltools here converts only)")
    if find_spec("coremltools") is None:
        return "No module named 'coremltools'; pip install 'deco-export[coreml]'"
    return None


def _import_coremltools() -> Any:
    try:
        import coremltools
    except ImportError as exc:
        raise BackendError(
            f"the coreml backend needs coremltools: {INSTALL_HINT}"
        ) from exc
    return coremltools


def split_batch(batch: int, sizes: Sequence[int]) -> list[int]:
    """Allowed batch sizes that add up to ``batch``, largest first (e.g. 6 -> [4, 2])."""
    allowed = sorted({int(s) for s in sizes if int(s) > 0}, reverse=True)
    if batch < 1:
        raise BackendError(f"batch must be at least 1, got {batch}")
    # Fewest pieces by dynamic programming; greedy is not optimal for sets such as {1, 3, 4}.
    best: list[list[int] | None] = [[]] + [None] * batch
    for n in range(1, batch + 1):
        for s in allowed:
            prev, cur = (best[n - s] if s <= n else None), best[n]
            if prev is not None and (cur is None or len(prev) + 1 < len(cur)):
                best[n] = [*prev, s]
    pieces = best[batch]
    if pieces is None:
        raise BackendError(
            f"batch {batch} cannot be split into the exported batch sizes {sorted(allowed)}; "
            "export with --batch-sizes including 1"
        )
    return sorted(pieces, reverse=True)


def check_package_io(path: str | os.PathLike[str], graph: str, config: ModelConfig,
                     spec: Any) -> None:
    """Refuse a package whose inputs and outputs (its ``Model`` spec's description) are not
    the ones the model's graph record names: a text-to-image DiT takes ``text_tokens``, a
    class-conditional one ``y``; optional outputs may be missing."""
    record = get_graph(graph, config)
    inputs = [f.name for f in spec.description.input]
    outputs = [f.name for f in spec.description.output]
    if set(inputs) != set(record.input_names) or not set(record.required_outputs) <= set(
            outputs):
        raise BackendError(
            f"{path}: the {graph} package has inputs {inputs} and outputs {outputs}, expected "
            f"{list(record.input_names)} -> {list(record.output_names)}; export it again with "
            "`deco export coreml`"
        )


class CoreMLBackend(HostArrays, GraphBackend):
    """Runs an exported bundle's Core ML packages (see the module docstring).

    bundle_dir / manifest: the bundle and its parsed manifest (read if None). precision:
    "fp16" (default) or "fp32". compute_units: override the exported choice. cache_dir /
    use_cache: the compiled-model cache (``runtimes.cache.cache_dir("coreml")``).
    """

    runtime = "coreml"

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest | None = None,
        *,
        precision: str = "fp16",
        compute_units: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
    ) -> None:
        self.bundle_dir: Path | None = Path(bundle_dir)
        manifest = manifest if manifest is not None else read_manifest(self.bundle_dir)
        specs = graphs_for(manifest.model)
        arts = {g: manifest.get_artifact("coreml", g, precision) for g in specs}
        if any(arts[g] is None for g, spec in specs.items() if spec.required):
            have = sorted({f"{a.graph}/{a.precision}" for a in manifest.artifacts
                           if a.runtime == "coreml"})
            if not have:
                runtimes = sorted({a.runtime for a in manifest.artifacts}) or ["none"]
                raise BackendError(
                    f"{self.bundle_dir} has no Core ML artefacts (it holds: "
                    f"{', '.join(runtimes)}); add them with `deco export coreml CHECKPOINT "
                    f"{self.bundle_dir}` (conversion works on any OS)"
                )
            raise BackendError(
                f"{self.bundle_dir} has no Core ML dit and decoder at {precision} (it has "
                f"{', '.join(have)}); pass a precision it has or export it with `deco export "
                f"coreml --precision {precision}`"
            )
        paths: dict[str, Path] = {}
        keys: dict[str, str] = {}
        for graph, art in arts.items():
            if art is None:
                continue
            path = self.bundle_dir / art.file
            if not path.is_dir():
                raise BundleError(f"{path}: missing; restore it or export the bundle again")
            paths[graph] = path
            keys[graph] = art.sha256
        dit = arts["dit"]
        assert dit is not None  # required, checked above
        details = dit.details
        batch_sizes = details.get("batch_sizes") or [1]
        units = compute_units or details.get("compute_units") or "ALL"
        self.precision = precision
        self._config = manifest.model
        self._setup(paths, keys, batch_sizes, units, cache_dir, use_cache)

    @classmethod
    def from_packages(
        cls,
        paths: Mapping[str, str | os.PathLike[str]],
        *,
        batch_sizes: Sequence[int] = (1, 2),
        compute_units: str = "ALL",
        precision: str = "fp16",
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = False,
        model: ModelConfig | None = None,
    ) -> CoreMLBackend:
        """A backend on packages outside a bundle ({"dit": path, "decoder": path, ...});
        the exporter uses it to gate staged packages before they are committed. ``model``
        says which graphs are required and what the DiT takes (a class-conditional DeCo's
        when left out)."""
        self = cls.__new__(cls)
        self.bundle_dir = None
        self.precision = precision
        self._config = model or ModelConfig()
        pkgs = {g: Path(p) for g, p in paths.items()}
        missing = [g for g, spec in graphs_for(model or ModelConfig()).items()
                   if spec.required and g not in pkgs]
        if missing:
            raise BackendError(f"from_packages needs the {' and '.join(missing)} package(s)")
        keys = {g: sha256_path(p) for g, p in pkgs.items()} if use_cache else {}
        self._setup(pkgs, keys, batch_sizes, compute_units, cache_dir, use_cache)
        return self

    def _setup(self, paths: Mapping[str, Path], keys: Mapping[str, str],
               batch_sizes: Sequence[int], compute_units: str,
               cache_dir: str | os.PathLike[str] | None, use_cache: bool) -> None:
        if compute_units not in COMPUTE_UNITS:
            raise BackendError(
                f"unknown compute units {compute_units!r}; choose one of {', '.join(COMPUTE_UNITS)}"
            )
        require_macos()
        self.ct = _import_coremltools()
        self.compute_units = compute_units
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir("coreml")
        self.use_cache = use_cache
        self.load_times: dict[str, dict[str, Any]] = {}
        self._models: dict[str, Any] = {}
        for graph, path in paths.items():
            self._models[graph] = self._load(graph, path, keys.get(graph))
        # A package holds every output its record declares (the exporter checks it).
        self.bind_graphs(self._config, {
            graph: get_graph(graph, self._config).output_names for graph in self._models})

    # -- loading -------------------------------------------------------------------------------

    def _cached_path(self, key: str) -> Path:
        tag = hashlib.sha256(f"{key}:{self.compute_units}".encode()).hexdigest()[:32]
        return self.cache_dir / f"{tag}.mlmodelc"

    def _load(self, graph: str, path: Path, key: str | None) -> Any:
        ct = self.ct
        units = getattr(ct.ComputeUnit, self.compute_units)
        started = time.perf_counter()
        cached = self._cached_path(key) if (self.use_cache and key) else None
        try:
            if cached is not None and cached.is_dir():
                model = ct.models.CompiledMLModel(str(cached), compute_units=units)
                kind = "warm"
            else:
                model = ct.models.MLModel(str(path), compute_units=units)
                kind = "cold"
                if cached is not None:
                    self._store_compiled(model, cached)
        except BackendError:
            raise
        except Exception as exc:  # Core ML raises plain RuntimeErrors with its own text
            raise BackendError(f"{path}: Core ML cannot load it: {exc}") from exc
        get_spec = getattr(model, "get_spec", None)  # a CompiledMLModel has no spec to read
        if callable(get_spec):
            check_package_io(path, graph, self._config, get_spec())
        self.load_times[graph] = {"seconds": round(time.perf_counter() - started, 3),
                                  "kind": kind, "compute_units": self.compute_units}
        return model

    def _store_compiled(self, model: Any, target: Path) -> None:
        """Copy the compiled model Core ML just made next to the cache, then rename it in, so
        a concurrent reader never sees a half-copied directory."""
        compiled = Path(model.get_compiled_model_path())
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with staging.staging_dir(target, "tmp") as tmp:
                shutil.copytree(compiled, tmp.path / "model.mlmodelc")
                os.replace(tmp.path / "model.mlmodelc", target)
        except OSError:
            pass  # another process cached it first, or the cache is read-only: load anyway

    # -- running -------------------------------------------------------------------------------

    def _predict(self, graph: str, output: str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        model = self._models[graph]
        batch = int(next(iter(feeds.values())).shape[0])
        pieces = split_batch(batch, self.batch_sizes)
        outs = []
        start = 0
        for n in pieces:
            part = {k: v[start:start + n] for k, v in feeds.items()}
            outs.append(np.asarray(model.predict(part)[output], dtype=np.float32))
            start += n
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    @staticmethod
    def _float(a: Any) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def _labels(y: Any) -> np.ndarray:
        y = np.asarray(y)
        if y.size and (y.min() < np.iinfo(np.int32).min or y.max() > np.iinfo(np.int32).max):
            raise BackendError("class labels do not fit int32, which Core ML inputs use")
        return np.ascontiguousarray(y, dtype=np.int32)

    def _run(self, graph: str, output: str, feeds: Mapping[str, Any]) -> np.ndarray:
        """Feeds as Core ML takes them (int64 inputs, class labels, as int32; the rest
        float32), run in the batch sizes the packages enumerate."""
        dtypes = {s.name: s.dtype for s in get_graph(graph, self._config).inputs}
        return self._predict(graph, output, {
            name: self._labels(a) if dtypes[name] == "int64" else self._float(a)
            for name, a in feeds.items()})

    def close(self) -> None:
        self._models.clear()

    def describe(self) -> dict[str, Any]:
        """What runs how: for logs and benchmark reports."""
        return {
            "backend": "coreml",
            "precision": self.precision,
            "compute_units": self.compute_units,
            "batch_sizes": list(self.batch_sizes),
            "load_times": self.load_times,
            "supports_refresh": self.supports_refresh,
            "supports_decoder_split": self.supports_decoder_split,
        }


def measure_load_times(
    bundle_dir: str | os.PathLike[str],
    precision: str = "fp16",
    compute_units: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Cold (compile) and warm (cached ``.mlmodelc``) load times of a bundle's packages.

    Uses a fresh cache directory unless one is given, so the first load is really cold.
    """
    own = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="deco-coreml-cache-")) if cache_dir is None \
        else Path(cache_dir)
    try:
        first = CoreMLBackend(bundle_dir, precision=precision, compute_units=compute_units,
                              cache_dir=cache)
        cold = dict(first.load_times)
        first.close()
        second = CoreMLBackend(bundle_dir, precision=precision, compute_units=compute_units,
                               cache_dir=cache)
        warm = dict(second.load_times)
        second.close()
    finally:
        if own:
            shutil.rmtree(cache, ignore_errors=True)
    return {"cold": cold, "warm": warm}
