"""TensorRT engine cache keys, the engine-directory layout and the refusal of engines that do
not match: plain Python, tested on every machine; the exporter (``deco_export.export.tensorrt``)
and the backend (``runtimes.backends.tensorrt``) share it. (The refusal stays beside the key: a
key that cannot be read is itself refused.)

**Cache keys.** An engine is valid for one ONNX file (sha256), one precision, one set of
profiles, one TensorRT version and one GPU (name and compute capability); the builder options
that change the engine are part of the key too. The key is the sha256 of those fields, and the
engine lives at ``engines/<graph>-<precision>-<key[:16]>/<graph>.plan`` next to an
``engine.json`` that repeats the fields, so engines for several GPUs can share one bundle and a
changed graph rebuilds alone. An engine whose fields do not match this machine is *stale* (its
ONNX changed) or *foreign* (another TensorRT or GPU): it is refused with the reason and the fix,
never deserialised.

The builder's timing cache is keyed the same way (TensorRT version and GPU), one file per pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.backend import BackendError
from runtimes.cache import cache_dir as default_cache_dir
from runtimes.sizes import SizeRange

__all__ = [
    "ENGINE_DIR",
    "ENGINE_JSON",
    "KEY_VERSION",
    "EngineEnvironment",
    "EngineKey",
    "EngineMismatchError",
    "ResolvedEngine",
    "build_options",
    "describe_mismatch",
    "engine_record",
    "key_digest",
    "resolve_engine",
    "timing_cache_path",
]

ENGINE_DIR = "engines"
ENGINE_JSON = "engine.json"
KEY_VERSION = 1



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
# The builder's timing cache


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def timing_cache_path(env: EngineEnvironment,
                      cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the builder's timing cache lives: one file per TensorRT version and GPU, shared by
    every build on this machine (timings from another GPU would mislead the builder).

    ``cache_dir`` defaults to ``runtimes.cache.cache_dir("tensorrt")`` (``~/.cache/deco/tensorrt``).
    """
    if cache_dir is None:
        cache_dir = default_cache_dir("tensorrt")
    name = (f"timing-trt{_slug(env.tensorrt_version)}-{_slug(env.gpu_name)}-"
            f"sm{env.compute_capability.replace('.', '')}.cache")
    return Path(cache_dir) / name
