"""TensorRT engine bookkeeping that needs neither TensorRT nor a GPU.

Everything here is plain Python so it is tested on every machine; the exporter
(``deco_export.export.tensorrt``) and the backend (``runtimes.backends.tensorrt``) share it.

**Buckets and profiles.** With classifier-free guidance the sampler runs the graphs on
``[uncond; cond]``, so a user batch ``b`` needs engine batch ``2b`` inside the guidance interval
and ``b`` outside it (fast CFG skips the unconditional half there). A bucket therefore yields two
engine batches, and every engine gets one *static* optimisation profile (min = opt = max) per
engine batch:

* TensorRT tunes kernels for exactly the shapes that run. A batch between buckets is padded up
  to the next one, so an engine never runs at an untuned in-range shape (dynamic-shape engines
  have produced NaNs there, and the first call after a shape change is slow).
* Every profile is static, so each bucket can capture a CUDA graph of a whole sampler step:
  dynamic batches and CUDA graphs coexist instead of excluding each other.

**Cache keys.** An engine is valid for one ONNX file (sha256), one precision, one set of
profiles, one TensorRT version and one GPU (name and compute capability); the builder options
that change the engine are part of the key too. The key is the sha256 of those fields, and the
engine lives at ``engines/<graph>-<precision>-<key[:16]>/<graph>.plan`` next to an
``engine.json`` that repeats the fields, so engines for several GPUs can share one bundle and a
changed graph rebuilds alone. An engine whose fields do not match this machine is *stale* (its
ONNX changed) or *foreign* (another TensorRT or GPU): it is refused with the reason and the fix,
never deserialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.backend import BackendError
from runtimes.config import ModelConfig
from runtimes.graphs import get_graph
from runtimes.sizes import SizeRange

__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "ENGINE_DIR",
    "ENGINE_JSON",
    "KEY_VERSION",
    "EngineEnvironment",
    "EngineKey",
    "EngineMismatchError",
    "Profile",
    "engine_batches",
    "guided_engine_batch",
    "normalize_buckets",
    "ort_tensorrt_provider_options",
    "parse_buckets",
    "profiles_for",
    "resolve_engine",
    "timing_cache_path",
    "unguided_engine_batch",
]

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)
ENGINE_DIR = "engines"
ENGINE_JSON = "engine.json"
KEY_VERSION = 1
MAX_ENGINE_BATCH = 4096  # the ONNX exporter's dynamic batch bound
_BUILD_FIELDS = ("builder_optimization_level", "workspace_bytes", "tf32")


# ---------------------------------------------------------------------------------------------
# Buckets -> engine batches -> profiles


def normalize_buckets(buckets: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated positive user batch sizes."""
    try:
        values = sorted({int(b) for b in buckets})
    except (TypeError, ValueError):
        raise ValueError(
            f"batch buckets must be integers, got {buckets!r}; e.g. 1,2,4,8"
        ) from None
    if not values or values[0] < 1:
        raise ValueError(
            f"batch buckets must be positive integers, got {list(buckets)}; e.g. 1,2,4,8")
    return tuple(values)


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        return normalize_buckets(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"cannot read batch buckets {text!r}; write positive integers separated by commas, "
            "e.g. 1,2,4,8"
        ) from None


def engine_batches(buckets: Iterable[int], cfg: bool = True) -> tuple[int, ...]:
    """The engine batch sizes a set of user buckets needs.

    Each bucket ``b`` needs ``b`` (unguided steps) and, with guidance, ``2b`` (the
    [uncond; cond] batch): buckets (1, 2, 4, 8) give engine batches (1, 2, 4, 8, 16).
    """
    user = normalize_buckets(buckets)
    out = set(user)
    if cfg:
        out |= {2 * b for b in user}
    if max(out) > MAX_ENGINE_BATCH:
        raise ValueError(
            f"engine batch {max(out)} exceeds {MAX_ENGINE_BATCH}, the ONNX graphs' batch bound; "
            "choose smaller buckets"
        )
    return tuple(sorted(out))


def unguided_engine_batch(rows: int, batches: Sequence[int]) -> int:
    """The engine batch that runs ``rows`` rows: the smallest that holds them (rows are padded)."""
    if rows < 1:
        raise ValueError(f"a batch needs at least one row, got {rows}")
    for n in sorted(batches):
        if n >= rows:
            return n
    raise ValueError(
        f"batch of {rows} rows is larger than the largest engine batch {max(batches)} "
        f"(engine batches {sorted(batches)}; a guided batch of b images needs 2b rows); "
        f"rebuild the engines with larger buckets, e.g. `deco export tensorrt BUNDLE "
        f"--batch-buckets {','.join(str(b) for b in _suggest(rows))}`"
    )


def guided_engine_batch(batch: int, batches: Sequence[int]) -> int:
    """The engine batch for a guided step of ``batch`` images: the smallest even engine batch
    whose halves hold ``batch`` rows each ([uncond | pad; cond | pad])."""
    if batch < 1:
        raise ValueError(f"a batch needs at least one image, got {batch}")
    for n in sorted(batches):
        if n % 2 == 0 and n // 2 >= batch:
            return n
    raise ValueError(
        f"a guided batch of {batch} images needs an engine batch of at least {2 * batch} "
        f"(engine batches {sorted(batches)}); rebuild the engines with larger buckets, e.g. "
        f"`deco export tensorrt BUNDLE --batch-buckets "
        f"{','.join(str(b) for b in _suggest(batch))}`"
    )


def _suggest(rows: int) -> list[int]:
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return [*out, b]


@dataclass(frozen=True)
class Profile:
    """One optimisation profile of one engine batch: every input's optimum shape
    (``shapes``) and, for graphs with dynamic height and width, the smallest and largest
    (``min_shapes`` / ``max_shapes``; None for a static profile, min = opt = max)."""

    batch: int
    shapes: dict[str, tuple[int, ...]]
    min_shapes: dict[str, tuple[int, ...]] | None = None
    max_shapes: dict[str, tuple[int, ...]] | None = None

    def bounds(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) of input ``name``, as `IOptimizationProfile.set_shape` takes them."""
        opt = self.shapes[name]
        return ((self.min_shapes or self.shapes)[name], opt, (self.max_shapes or self.shapes)[name])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"batch": self.batch,
                             "shapes": {k: list(v) for k, v in self.shapes.items()}}
        if self.min_shapes is not None and self.max_shapes is not None:
            d["min_shapes"] = {k: list(v) for k, v in self.min_shapes.items()}
            d["max_shapes"] = {k: list(v) for k, v in self.max_shapes.items()}
        return d


def profiles_for(graph: str, model: ModelConfig | Mapping[str, Any], image_size: Sequence[int],
                 batches: Sequence[int], sizes: SizeRange | None = None) -> list[Profile]:
    """One profile per engine batch for ``graph`` of a model config (or its dict): static at
    ``image_size``, or, with a ``sizes`` range of several sizes, spanning it with the optimum
    at its default size."""
    if not isinstance(model, ModelConfig):
        model = ModelConfig.from_dict(model)
    spec = get_graph(graph, model)
    if sizes is not None and not sizes.is_fixed:
        return [Profile(n, {k: v[1] for k, v in shapes.items()},
                        {k: v[0] for k, v in shapes.items()},
                        {k: v[2] for k, v in shapes.items()})
                for n, shapes in spec.tensorrt_profile_ranges(model, sizes, batches)]
    return [Profile(n, shapes) for n, shapes in
            spec.tensorrt_profiles(model, int(image_size[0]), int(image_size[1]), batches)]


# ---------------------------------------------------------------------------------------------
# Cache keys and the engine-directory layout


@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine is bound to on the machine that runs it."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def fields(self) -> dict[str, str]:
        return {"tensorrt": self.tensorrt_version, "gpu": self.gpu_name,
                "compute_capability": self.compute_capability}


@dataclass(frozen=True)
class EngineKey:
    """The fields an engine depends on; ``digest`` is their sha256 (the cache key)."""

    graph: str
    precision: str
    onnx_sha256: str
    image_size: tuple[int, int]
    engine_batches: tuple[int, ...]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    build: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] | None = None  # the size range profiles span (None: image_size only)

    def fields(self) -> dict[str, Any]:
        extra = {} if self.sizes is None else {"sizes": dict(self.sizes)}
        return {**extra,
            "key_version": KEY_VERSION,
            "graph": self.graph,
            "precision": self.precision,
            "onnx_sha256": self.onnx_sha256,
            "image_size": [int(s) for s in self.image_size],
            "engine_batches": [int(b) for b in self.engine_batches],
            "tensorrt": self.tensorrt_version,
            "gpu": self.gpu_name,
            "compute_capability": self.compute_capability,
            "build": {k: self.build.get(k) for k in sorted(self.build)},
        }

    @classmethod
    def from_fields(cls, d: Mapping[str, Any]) -> EngineKey:
        try:
            return cls(
                graph=str(d["graph"]), precision=str(d["precision"]),
                onnx_sha256=str(d["onnx_sha256"]),
                image_size=(int(d["image_size"][0]), int(d["image_size"][1])),
                engine_batches=tuple(int(b) for b in d["engine_batches"]),
                tensorrt_version=str(d["tensorrt"]), gpu_name=str(d["gpu"]),
                compute_capability=str(d["compute_capability"]),
                build=dict(d.get("build", {})),
                sizes=None if d.get("sizes") is None else dict(d["sizes"]),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise EngineMismatchError(
                "corrupt", [f"the engine's key fields are incomplete ({exc!r})"]
            ) from None

    @property
    def digest(self) -> str:
        return key_digest(self.fields())

    @property
    def dir_name(self) -> str:
        return f"{self.graph}-{self.precision}-{self.digest[:16]}"

    @property
    def relpath(self) -> str:
        """The plan's path inside the bundle."""
        return f"{ENGINE_DIR}/{self.dir_name}/{self.graph}.plan"

    @property
    def json_relpath(self) -> str:
        return f"{ENGINE_DIR}/{self.dir_name}/{ENGINE_JSON}"

    def for_environment(self, env: EngineEnvironment) -> EngineKey:
        return EngineKey(self.graph, self.precision, self.onnx_sha256, self.image_size,
                         self.engine_batches, env.tensorrt_version, env.gpu_name,
                         env.compute_capability, dict(self.build), self.sizes)

    def with_onnx(self, onnx_sha256: str) -> EngineKey:
        return EngineKey(self.graph, self.precision, onnx_sha256, self.image_size,
                         self.engine_batches, self.tensorrt_version, self.gpu_name,
                         self.compute_capability, dict(self.build), self.sizes)

    @property
    def size_range(self) -> SizeRange:
        """The sizes the engine runs: its profiles' range, or its one image size."""
        if self.sizes is not None:
            return SizeRange.from_dict(self.sizes, where="engine key sizes")
        return SizeRange.fixed(self.image_size, 1)


def key_digest(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the key fields."""
    text = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def build_options(builder_optimization_level: int = 3, workspace_bytes: int | None = None,
                  tf32: bool = False) -> dict[str, Any]:
    """The builder options that change the engine (and so belong to its key)."""
    if not 0 <= int(builder_optimization_level) <= 5:
        raise ValueError(
            f"builder optimisation level must be 0..5 (TensorRT's default is 3), got "
            f"{builder_optimization_level}"
        )
    if workspace_bytes is not None and int(workspace_bytes) <= 0:
        raise ValueError(f"workspace limit must be positive, got {workspace_bytes} bytes")
    return {"builder_optimization_level": int(builder_optimization_level),
            "workspace_bytes": None if workspace_bytes is None else int(workspace_bytes),
            "tf32": bool(tf32)}


# ---------------------------------------------------------------------------------------------
# Stale / foreign engines


class EngineMismatchError(BackendError):
    """An engine cannot be used on this machine. ``kind`` is "stale" (its ONNX changed),
    "foreign" (another TensorRT version or GPU) or "corrupt"; ``reasons`` are one line each."""

    def __init__(self, kind: str, reasons: list[str], where: str = "", fix: str = "") -> None:
        self.kind = kind
        self.reasons = list(reasons)
        head = f"{where}: " if where else ""
        tail = f"; {fix}" if fix else ""
        super().__init__(f"{head}{kind} TensorRT engine, not run: " + "; ".join(reasons) + tail)


def describe_mismatch(recorded: Mapping[str, Any],
                      expected: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(kind, reasons) explaining why an engine built with ``recorded`` fields does not match
    the ``expected`` fields of this machine and bundle; ("", []) when they match."""
    reasons: list[str] = []
    kind = ""
    if recorded.get("onnx_sha256") != expected.get("onnx_sha256"):
        kind = "stale"
        reasons.append(
            f"its ONNX graph changed since it was built (engine built from sha256 "
            f"{str(recorded.get('onnx_sha256'))[:12]}..., the bundle's graph is "
            f"{str(expected.get('onnx_sha256'))[:12]}...)"
        )
    if recorded.get("tensorrt") != expected.get("tensorrt"):
        kind = kind or "foreign"
        reasons.append(
            f"it was built with TensorRT {recorded.get('tensorrt')}, this machine has "
            f"TensorRT {expected.get('tensorrt')} (an engine loads only in the version that "
            f"built it)"
        )
    if (recorded.get("gpu"), recorded.get("compute_capability")) != (
            expected.get("gpu"), expected.get("compute_capability")):
        kind = kind or "foreign"
        reasons.append(
            f"it was built for {recorded.get('gpu')} (compute capability "
            f"{recorded.get('compute_capability')}), this GPU is {expected.get('gpu')} "
            f"(compute capability {expected.get('compute_capability')})"
        )
    for name in ("key_version", "graph", "precision", "image_size", "engine_batches", "build",
                 "sizes"):
        if recorded.get(name) != expected.get(name):
            kind = kind or "stale"
            reasons.append(f"its {name} is {recorded.get(name)!r}, expected {expected.get(name)!r}")
    return kind, reasons


@dataclass(frozen=True)
class ResolvedEngine:
    """A plan that may run here: its path inside the bundle, its key and its sha256."""

    relpath: str
    key: EngineKey
    sha256: str | None


def resolve_engine(bundle_dir: str | os.PathLike[str], details: Mapping[str, Any],
                   recorded_file: str, recorded_sha256: str | None, env: EngineEnvironment,
                   onnx_sha256: str | None = None, rebuild_hint: str = "") -> ResolvedEngine:
    """The plan to load for a manifest TensorRT artifact on this machine, or EngineMismatchError.

    ``details`` is the artifact's details (with "key" and "cache_key"), ``onnx_sha256`` the
    bundle's current ONNX graph for it (None when the manifest lists none, e.g. while staging).
    When the recorded engine is foreign, an engine built earlier for this machine under
    ``engines/<key>/`` is used instead if its ``engine.json`` matches exactly.
    """
    where = recorded_file
    fix = rebuild_hint or "build engines for this machine with `deco export tensorrt BUNDLE`"
    if "key" not in details or "cache_key" not in details:
        raise EngineMismatchError("corrupt", ["its manifest entry has no cache key"], where, fix)
    recorded = EngineKey.from_fields(details["key"])
    if details["cache_key"] != recorded.digest or (
            key_digest(details["key"]) != details["cache_key"]):
        raise EngineMismatchError(
            "corrupt", ["its cache key does not match its recorded fields (edited manifest?)"],
            where, fix)
    expected = recorded.for_environment(env)
    if onnx_sha256 is not None:
        expected = expected.with_onnx(onnx_sha256)
    if expected.digest == recorded.digest:
        return ResolvedEngine(recorded_file, recorded, recorded_sha256)
    alternative = Path(bundle_dir) / expected.json_relpath
    if alternative.is_file():
        try:
            info = json.loads(alternative.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            info = {}
        if (info.get("cache_key") == expected.digest
                and key_digest(info.get("key", {})) == expected.digest
                and (Path(bundle_dir) / expected.relpath).is_file()):
            return ResolvedEngine(expected.relpath, expected, info.get("plan_sha256"))
    kind, reasons = describe_mismatch(recorded.fields(), expected.fields())
    raise EngineMismatchError(kind or "stale", reasons or ["its key differs"], where, fix)


def engine_record(key: EngineKey, plan_sha256: str, plan_bytes: int,
                  **extra: Any) -> dict[str, Any]:
    """What ``engine.json`` holds: the key fields, the key, the plan's hash and size."""
    return {"key": key.fields(), "cache_key": key.digest, "plan_sha256": plan_sha256,
            "plan_bytes": int(plan_bytes), **extra}


# ---------------------------------------------------------------------------------------------
# Timing cache and the ONNX Runtime TensorRT execution provider


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def timing_cache_path(env: EngineEnvironment,
                      cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the builder's timing cache lives: one file per TensorRT version and GPU, shared by
    every build on this machine (timings from another GPU would mislead the builder).

    ``cache_dir`` defaults to ``$DECO_CACHE_DIR`` or ``$XDG_CACHE_HOME/deco`` (``~/.cache/deco``).
    """
    if cache_dir is None:
        base = os.environ.get("DECO_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "deco")
        cache_dir = Path(base) / "tensorrt"
    name = (f"timing-trt{_slug(env.tensorrt_version)}-{_slug(env.gpu_name)}-"
            f"sm{env.compute_capability.replace('.', '')}.cache")
    return Path(cache_dir) / name


def ort_tensorrt_provider_options(
    cache_dir: str | os.PathLike[str],
    *,
    device_id: int = 0,
    builder_optimization_level: int = 3,
    workspace_bytes: int | None = None,
    fp16_kernels: bool = False,
    cuda_graph: bool = False,
    profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
) -> dict[str, str]:
    """Provider options for ONNX Runtime's TensorRT execution provider: the simpler route,
    where ONNX Runtime builds and caches the engines itself.

    Use as ``runtimes.load(bundle, providers=[("tensorrt", opts), "cuda"])``. Engines and the
    timing cache go under ``cache_dir`` (e.g. ``BUNDLE/engines/ort-tensorrt``); ONNX Runtime
    names them by graph hash and GPU and rebuilds on a TensorRT version change. Precision comes
    from the graph: pick the bundle's fp16 graphs for fp16. ``fp16_kernels`` additionally lets
    TensorRT 10 run fp32 graphs in fp16 (weak typing; TensorRT 11 ignores it). ``profile`` maps
    input names to (min, opt, max) shapes for one graph; without it the provider builds for the
    shapes it sees (one engine per shape, cached). ``cuda_graph`` needs static shapes.
    """
    path = Path(cache_dir)
    opts: dict[str, str] = {
        "device_id": str(int(device_id)),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(path),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(path),
        "trt_builder_optimization_level": str(build_options(builder_optimization_level)[
            "builder_optimization_level"]),
    }
    if workspace_bytes is not None:
        opts["trt_max_workspace_size"] = str(build_options(3, workspace_bytes)["workspace_bytes"])
    if fp16_kernels:
        opts["trt_fp16_enable"] = "True"
    if cuda_graph:
        opts["trt_cuda_graph_enable"] = "True"
    if profile:
        for i, sel in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes",
                                 "trt_profile_max_shapes")):
            opts[sel] = ",".join(f"{name}:{'x'.join(str(int(d)) for d in shapes[i])}"
                                 for name, shapes in profile.items())
    return opts
