"""What this machine's CPU can do: the instruction-set flags that decide which reduced
precisions run natively (read from /proc/cpuinfo), and its measured GEMM peak per precision,
for the benchmark's environment record and roofline columns and for tests that need bf16 or
int8 dot-product hardware.

Only the flags that change a row's ceiling are reported: ``avx512_bf16`` and ``amx_bf16``
(bf16 matrix work; without them bf16 is emulated or refused), ``avx512_vnni`` / ``avx_vnni``
and ``amx_int8`` (int8 dot products), and the vector widths (``avx2``, ``avx512f``).

The peak is measured, not looked up: a square matrix product in PyTorch (oneDNN underneath,
as in every backend here), the best of a few runs, at the thread count the benchmark uses.
A datasheet number would not know the VM's clock, its share of a core or the other work on
the machine; a measurement taken in the same run as the rows it divides does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from runtimes.cpu import cpu_flags, cpu_model, has_bf16, missing_bf16_reason

__all__ = [
    "RELEVANT_FLAGS",
    "cpu_description",
    "cpu_features",
    "cpu_flags",
    "cpu_model",
    "gemm_peak",
    "has_bf16",
    "has_int8_dot",
    "missing_bf16_reason",
    "peak_unavailable_reason",
    "roofline",
]

RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                  "avx512_vnni", "avx_vnni", "amx_int8")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> dict[str, str]:
    """The CPU record every study writes beside its figures: the model, the flags that decide
    its speed, and the cores this process may use."""
    import os

    wanted = ("avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "fma")
    flags = cpu_flags()
    return {"model": cpu_model(), "flags": " ".join(f for f in wanted if f in flags),
            "cores": str(os.cpu_count())}


def cpu_features() -> dict[str, bool]:
    """Each flag of `RELEVANT_FLAGS`: present or not."""
    flags = cpu_flags()
    return {name: name in flags for name in RELEVANT_FLAGS}


def has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (VNNI or AMX-INT8)."""
    return any(f in cpu_flags() for f in INT8_DOT_FLAGS)


PEAK_PRECISIONS = ("fp32", "bf16", "int8")


def peak_unavailable_reason(precision: str) -> str | None:
    """Why the GEMM peak at ``precision`` is not measured here (no native instructions)."""
    if precision == "bf16":
        return missing_bf16_reason()
    if precision == "int8" and not has_int8_dot():
        return (f"this CPU ({cpu_model()}) has no int8 dot-product instructions (neither "
                f"{' nor '.join(INT8_DOT_FLAGS)} in /proc/cpuinfo)")
    if precision not in PEAK_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PEAK_PRECISIONS)}, "
                         f"not {precision!r}")
    return None


def gemm_peak(precisions: Sequence[str] = PEAK_PRECISIONS, *, threads: int | None = 1,
              size: int = 2048, repeats: int = 5) -> dict[str, dict[str, Any]]:
    """This machine's matrix-product peak per precision, in GFLOP/s.

    One ``size`` x ``size`` x ``size`` product (2 size^3 FLOPs) per run: ``a @ b`` in fp32
    and bf16, ``torch._int_mm`` (int8 x int8 -> int32) for int8; after one warm-up, the best of
    ``repeats`` runs (a peak, not a typical value). A precision without native instructions is
    reported with its reason instead of a number. ``threads`` is PyTorch's intra-op thread
    count during the probe (restored afterwards; None leaves it as it is).
    """
    import torch

    out: dict[str, dict[str, Any]] = {}
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        for precision in precisions:
            reason = peak_unavailable_reason(precision)
            if reason is not None:
                out[precision] = {"gflops": None, "reason": reason}
                continue
            gen = torch.Generator().manual_seed(0)
            if precision == "int8":
                a = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=gen)
                b = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=gen)
                run = lambda a=a, b=b: torch._int_mm(a, b)  # noqa: E731
            else:
                dtype = torch.float32 if precision == "fp32" else torch.bfloat16
                a = torch.randn(size, size, generator=gen).to(dtype)
                b = torch.randn(size, size, generator=gen).to(dtype)
                run = lambda a=a, b=b: a @ b  # noqa: E731
            run()
            best = float("inf")
            for _ in range(max(1, int(repeats))):
                started = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - started)
            out[precision] = {"gflops": 2.0 * size**3 / best / 1e9, "size": size,
                              "seconds": best, "threads": torch.get_num_threads(),
                              "op": "torch._int_mm" if precision == "int8" else "matmul"}
    finally:
        torch.set_num_threads(saved)
    return out


def roofline(flops: float, seconds: float, peak_gflops: float | None) -> dict[str, Any]:
    """Achieved GFLOP/s of ``flops`` done in ``seconds`` and its percentage of the peak."""
    achieved = flops / seconds / 1e9 if seconds > 0 else None
    percent = (100.0 * achieved / peak_gflops
               if achieved is not None and peak_gflops else None)
    return {"gflops": achieved, "percent_of_peak": percent}
