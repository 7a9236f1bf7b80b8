"""What this process's CPU is, as far as the int8 graphs care.

ONNX Runtime's integer matrix kernels differ by CPU: with VNNI or AMX (``vpdpbusd``, tile
products) uint8 x int8 products are summed exactly in int32; with AVX2 alone
(``vpmaddubsw``) pairs of products are added in a saturating int16 first; ARM has its own dot
products. An int8 graph's parity gate therefore holds for the kernel kind it ran on; the
manifest records that kind (`int8_kernel`) so a loader on another kind can say so.

Flags come from /proc/cpuinfo (Linux); elsewhere the kernel kind is "unknown" on x86 (neither
Windows nor macOS exposes the flags without native calls) and "arm64" on ARM.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

__all__ = ["BF16_FLAGS", "INT8_KERNELS", "cpu_flags", "cpu_model", "cpu_record", "has_bf16",
           "int8_kernel", "missing_bf16_reason"]

CPUINFO = Path("/proc/cpuinfo")
# The int8 kernel kinds, each with the flags that select it, in the order ONNX Runtime's MLAS
# prefers them.
INT8_KERNELS: dict[str, tuple[str, ...]] = {
    "amx": ("amx_int8",),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "avx2": ("avx2",),
}
# The flags of native bf16 matrix work (without them bf16 is emulated or refused).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first processor's ``flags`` line); empty where
    /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, ``sysctl`` on macOS, else what
    ``platform`` knows (every figure the package reports names its CPU with this)."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        with contextlib.suppress(Exception):
            brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            if brand:
                return brand
    return platform.processor() or platform.machine() or "unknown CPU"


def has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX-BF16)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def missing_bf16_reason() -> str | None:
    """None on a CPU with bf16 instructions, else one line saying what is missing."""
    if has_bf16():
        return None
    return (f"this CPU ({cpu_model()}) has no bf16 instructions (neither "
            f"{' nor '.join(BF16_FLAGS)} in /proc/cpuinfo): bf16 would not run natively")


def int8_kernel() -> str:
    """The kind of int8 matrix kernel ONNX Runtime runs here: "amx", "avx512_vnni",
    "avx_vnni", "avx2", "arm64", or "unknown" (x86 without readable flags, or none of them)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags()
    for kind, needs in INT8_KERNELS.items():
        if any(f in flags for f in needs):
            return kind
    return "unknown"


def cpu_record() -> dict[str, object]:
    """What a parity gate records about the CPU it ran on."""
    return {"model": cpu_model(), "int8_kernel": int8_kernel(),
            "flags": sorted(f for f in cpu_flags() if f in INT8_FLAGS)}
