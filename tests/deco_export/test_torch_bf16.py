"""PyTorch on the CPU in bf16 (autocast, eager and torch.compile): held to the bf16 gate per
graph and end to end, like every backend."""

from __future__ import annotations

import shutil

import pytest

import runtimes
from deco_export import parity
from deco_export.backends.torch_backend import TorchBackend
from deco_export.machine import missing_bf16_reason
from deco_export.validate import gate_backend
from runtimes.sampler import release_sampler

NO_BF16 = missing_bf16_reason()
pytestmark = pytest.mark.skipif(NO_BF16 is not None, reason=NO_BF16 or "")


def _opener(model, compile: bool):
    def open_pipeline():
        backend = TorchBackend(model, device="cpu", precision="bf16", compile=compile)
        return runtimes.DeCoPipeline(backend, model.config.to_dict(),
                                     release_sampler(model.config.family))
    return open_pipeline


@pytest.mark.parametrize("compile", [
    False,
    pytest.param(True, marks=[pytest.mark.slow, pytest.mark.skipif(
        not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
        reason="torch.compile on the CPU needs a C++ compiler")]),
], ids=["eager", "compile"])
def test_bf16_autocast_passes_the_gate(golden_model, compile):
    lines, figures = gate_backend(golden_model, _opener(golden_model, compile), "bf16",
                                  (64, 64), steps=4, what=f"torch bf16 compile={compile}")
    assert lines[0].endswith("passed")
    graphs = figures["graphs"]
    assert {g["graph"] for g in graphs} == {"dit.cond", "dit.hidden", "decoder", "refresh",
                                           "decoder_cond", "decoder_pixel"}
    assert min(g["psnr_db"] for g in graphs) >= parity.GRAPH_MIN_PSNR["bf16"]
    # bf16 really ran: fp32 autocast-free graphs agree with PyTorch to ~1e-6.
    assert max(g["max_abs_error"] for g in graphs) > 1e-4
    assert figures["end_to_end"]["psnr_db"] >= parity.END_TO_END_MIN_PSNR["bf16"]


def test_the_bf16_gate_refuses_what_falls_below_it(golden_model, monkeypatch):
    monkeypatch.setitem(parity.END_TO_END_MIN_PSNR, "bf16", 1e9)
    with pytest.raises(parity.ParityError, match=r"end-to-end images \(bf16\)"):
        gate_backend(golden_model, _opener(golden_model, False), "bf16", (64, 64), steps=2)
