"""The kind of int8 kernel a CPU runs, read from its flags (runtimes.cpu)."""

from __future__ import annotations

import platform

import pytest

from runtimes import cpu


@pytest.fixture
def fake_cpuinfo(tmp_path, monkeypatch):
    def write(flags: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
        monkeypatch.setattr(cpu, "CPUINFO", path)
        cpu.cpu_flags.cache_clear()
        cpu.cpu_model.cache_clear()

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    yield write
    cpu.cpu_flags.cache_clear()
    cpu.cpu_model.cache_clear()


@pytest.mark.parametrize("flags, kind", [
    ("fpu sse2 avx2 fma", "avx2"),
    ("avx2 avx512f avx512bw avx512_vnni", "avx512_vnni"),
    ("avx2 avx_vnni", "avx_vnni"),
    ("avx2 avx512f avx512_vnni amx_tile amx_int8", "amx"),
    ("fpu sse2", "unknown"),
])
def test_int8_kernel_follows_the_flags_onnx_runtime_dispatches_on(fake_cpuinfo, flags, kind):
    fake_cpuinfo(flags)
    assert cpu.int8_kernel() == kind
    record = cpu.cpu_record()
    assert record["model"] == "Test CPU" and record["int8_kernel"] == kind
    assert set(record["flags"]) <= set(flags.split())


def test_arm_is_its_own_kind(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu.int8_kernel() == "arm64"


def test_no_cpuinfo_means_no_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "absent")
    cpu.cpu_flags.cache_clear()
    try:
        assert cpu.cpu_flags() == frozenset()
    finally:
        cpu.cpu_flags.cache_clear()
