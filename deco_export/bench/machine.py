"""Where the numbers come from: the machine, its libraries, and a process's memory."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..machine import cpu_features, cpu_model


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
             "onnxruntime-gpu", "openvino", "coremltools", "tensorrt", "matplotlib")


def environment(threads: int | None = None) -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, threads, GPU and driver, OS, library versions.

    The load average is recorded because on a shared machine it explains the absolute times.
    """
    env: dict[str, Any] = {
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_gib": _memory_total_gib(),
        "python": platform.python_version(),
        "libraries": {name: v for name in LIBRARIES if (v := _version(name)) is not None},
        "threads_requested": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpus": _gpus(),
        "cpu_flags": cpu_features(),
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return env


def measure_peaks(threads: int | None, size: int) -> dict[str, Any]:
    """This machine's GEMM peak per precision (`deco_export.machine.gemm_peak`), measured
    once per benchmark at the rows' thread count; {} when ``size`` is 0, and the reason when
    torch (which the probe multiplies with) is missing."""
    if not size:
        return {}
    if find_spec("torch") is None:
        return {p: {"gflops": None, "reason": "No module named 'torch'"}
                for p in ("fp32", "bf16", "int8")}
    from ..machine import gemm_peak

    return gemm_peak(threads=threads or os.cpu_count(), size=size)


def best_peaks(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Per precision the higher of two probes, with both figures kept (``probes``)."""
    out: dict[str, Any] = {}
    for precision in dict.fromkeys([*first, *second]):
        a, b = first.get(precision, {}), second.get(precision, {})
        pick = max((a, b), key=lambda p: p.get("gflops") or 0.0)
        out[precision] = {**pick, "probes": [a.get("gflops"), b.get("gflops")]}
    return out


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


def cuda_available() -> bool:
    if find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())
