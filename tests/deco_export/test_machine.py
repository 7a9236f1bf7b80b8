"""The CPU flags the benchmark records, and the measured GEMM peak behind its roofline."""

from __future__ import annotations

import sys

import pytest

from deco_export import machine
from runtimes import cpu


def test_flags_come_from_proc_cpuinfo(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                    "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu\n")
    monkeypatch.setattr(cpu, "CPUINFO", fake)
    cpu.cpu_flags.cache_clear()
    cpu.cpu_model.cache_clear()
    try:
        assert machine.cpu_model() == "Test CPU 9000"
        features = machine.cpu_features()
        assert features["avx512_vnni"] and features["avx2"] and not features["avx512_bf16"]
        assert set(features) == set(machine.RELEVANT_FLAGS)
        assert not machine.has_bf16() and machine.has_int8_dot()
        reason = machine.missing_bf16_reason()
        assert reason is not None and "Test CPU 9000" in reason and "avx512_bf16" in reason
        assert machine.peak_unavailable_reason("int8") is None
        assert machine.gemm_peak(["bf16"], size=64, repeats=1)["bf16"] == {
            "gflops": None, "reason": reason}
    finally:
        cpu.cpu_flags.cache_clear()
        cpu.cpu_model.cache_clear()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_this_machine_reports_its_flags():
    assert machine.cpu_flags(), "/proc/cpuinfo has a flags line on Linux x86 and Arm"
    assert machine.has_bf16() == (machine.missing_bf16_reason() is None)


def test_fp32_peak_is_measured_and_threads_are_restored():
    import torch

    before = torch.get_num_threads()
    peak = machine.gemm_peak(["fp32", "int8"], threads=1, size=256, repeats=2)
    assert torch.get_num_threads() == before
    assert peak["fp32"]["gflops"] > 0.1 and peak["fp32"]["size"] == 256
    assert peak["fp32"]["threads"] == 1
    if machine.has_int8_dot():
        assert peak["int8"]["gflops"] > 0.1 and peak["int8"]["op"] == "torch._int_mm"
    else:
        assert peak["int8"]["gflops"] is None and "int8" in peak["int8"]["reason"]
    with pytest.raises(ValueError, match="precision must be one of"):
        machine.gemm_peak(["fp8"])


def test_roofline_arithmetic():
    assert machine.roofline(4e9, 2.0, 4.0) == {"gflops": 2.0, "percent_of_peak": 50.0}
    assert machine.roofline(4e9, 2.0, None) == {"gflops": 2.0, "percent_of_peak": None}


def test_the_better_of_two_probes_is_kept():
    from deco_export.bench.machine import best_peaks

    first = {"fp32": {"gflops": 20.0, "size": 64}, "bf16": {"gflops": None, "reason": "no"}}
    second = {"fp32": {"gflops": 30.0, "size": 64}, "bf16": {"gflops": None, "reason": "no"}}
    best = best_peaks(first, second)
    assert best["fp32"] == {"gflops": 30.0, "size": 64, "probes": [20.0, 30.0]}
    assert best["bf16"]["gflops"] is None and best["bf16"]["reason"] == "no"
    assert best_peaks({}, {}) == {}
