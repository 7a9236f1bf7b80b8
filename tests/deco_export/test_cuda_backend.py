"""The PyTorch CUDA fast backend.

Everywhere: the fused whole-step path (buckets, static buffers, label rebinding, the switch
between guided and unguided steps) runs on the CPU with ``allow_cpu`` and must give exactly the
sampler's result; the missing-GPU error is checked. With a CUDA GPU: torch.compile plus the
captured CUDA graphs must match PyTorch eager fp32 within the bf16 gate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deco_export import DeCo, get_preset
from deco_export.backends.cuda_backend import CudaGraphBackend, guided_step, unguided_step
from deco_export.backends.torch_backend import TorchBackend
from deco_export.parity import END_TO_END_MIN_PSNR, psnr
from runtimes.sampler import SamplerConfig, sample

NULL = 10


@pytest.fixture(scope="module")
def model() -> DeCo:
    torch.manual_seed(0)
    net = DeCo(get_preset("DeCo-tiny/16")).eval()
    with torch.no_grad():  # the reference init zeroes the decoder's output: make v non-trivial
        for p in net.parameters():
            if not p.abs().sum():
                p.normal_(std=0.05)
    return net


def _noise(b: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """32x32 keeps CPU runs short (the model runs at any multiple of its patch size)."""
    return np.random.default_rng(seed).standard_normal((b, 3, size, size)).astype(np.float32)


def _cpu(model: DeCo, precision: str = "fp32") -> CudaGraphBackend:
    return CudaGraphBackend(model, device="cpu", precision=precision, compile=False,
                            allow_cpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_needs_a_gpu_and_says_what_to_use(model):
    with pytest.raises(ValueError, match="NVIDIA GPU.*TorchBackend"):
        CudaGraphBackend(model)
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        CudaGraphBackend(model, device="cpu")


def test_rejects_unknown_settings(model):
    with pytest.raises(ValueError, match="precision"):
        CudaGraphBackend(model, precision="int8", allow_cpu=True, device="cpu")
    with pytest.raises(ValueError, match="compile_mode"):
        CudaGraphBackend(model, compile_mode="fast", allow_cpu=True, device="cpu")


@pytest.mark.parametrize("cfg_mode", ["fast", "reference"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_steps_equal_the_sampler_exactly(model, cfg_mode, batch):
    """Guided inside (0.3, 1], unguided below: the fused path does the sampler's arithmetic."""
    cfg = SamplerConfig(num_steps=6, guidance=3.0, guidance_interval=(0.3, 1.0),
                        cfg_mode=cfg_mode)
    labels = np.array([1, 2, NULL])[:batch]
    noise = _noise(batch)
    be = _cpu(model)
    fused = sample(be, noise, labels, cfg, null_class=NULL)
    unfused = sample(be, noise, labels, cfg, null_class=NULL, fused_step=False)
    reference = sample(TorchBackend(model), noise, labels, cfg, null_class=NULL)
    assert np.array_equal(fused, unfused)
    assert np.array_equal(fused, reference)


def test_buffers_are_reused_and_relabelled_between_runs(model):
    cfg = SamplerConfig(num_steps=6, guidance=2.0, guidance_interval=(0.2, 1.0))
    be, ref = _cpu(model), TorchBackend(model)
    first = sample(be, _noise(2, 1), np.array([1, 2]), cfg, null_class=NULL)
    second = sample(be, _noise(2, 2), np.array([5, 6]), cfg, null_class=NULL)
    assert len(be._buckets) == 1  # one (batch, H, W) bucket serves both runs
    assert np.array_equal(second, sample(ref, _noise(2, 2), np.array([5, 6]), cfg,
                                         null_class=NULL))
    assert np.array_equal(first, sample(ref, _noise(2, 1), np.array([1, 2]), cfg,
                                        null_class=NULL))
    sample(be, _noise(1), np.array([3]), cfg, null_class=NULL)
    assert sorted(be._buckets) == [(1, 32, 32), (2, 32, 32)]
    # One device (t, dt, w) record per distinct step, shared by runs on the same grid.
    assert len(be._params) == 6


def test_step_returns_its_state_buffer_and_takes_it_back_without_copying(model):
    be = _cpu(model)
    x = be.from_numpy(_noise(2))
    y2 = be.from_numpy(np.array([NULL, NULL, 1, 2]))
    out = be.step(x, y2, 0.5, 0.1, 2.0)
    bucket = be._buckets[(2, 32, 32)]
    assert out is bucket.x and out.data_ptr() != x.data_ptr()
    before = out.clone()
    out2 = be.step(out, y2, 0.6, 0.1, 2.0)
    assert out2 is out and not torch.equal(out2, before)


def test_step_functions_match_the_two_graph_calls(model):
    x = torch.from_numpy(_noise(2))
    y2 = torch.tensor([NULL, NULL, 3, 4])
    params = torch.tensor([0.4, 0.05, 2.5])
    with torch.no_grad():
        x2 = torch.cat([x, x])
        cond, _ = model.dit(x2, torch.full((4,), 0.4), y2)
        v = model.decoder(x2, cond)
        expected = x + (v[:2] + (v[2:] - v[:2]) * 2.5) * 0.05
        got = guided_step(model, torch.float32, x, y2, params)
        assert torch.equal(got, expected)
        cond, _ = model.dit(x, torch.full((2,), 0.4), y2[2:])
        expected = x + model.decoder(x, cond) * 0.05
        assert torch.equal(unguided_step(model, torch.float32, x, y2[2:], params), expected)


def test_protocol_calls_and_bf16_quality(model):
    cfg = SamplerConfig(num_steps=6, guidance=3.0, guidance_interval=(0.1, 1.0),
                        cfg_mode="reference")
    noise, labels = _noise(3), np.array([1, 2, NULL])
    reference = sample(TorchBackend(model), noise, labels, cfg, null_class=NULL)
    be = _cpu(model, "bf16")
    assert be.model.dit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.dit.blocks[0].attn.qkv.weight.dtype == torch.float32  # the caller's is untouched
    for fused in (True, False):
        got = sample(be, noise, labels, cfg, null_class=NULL, fused_step=fused)
        assert psnr(reference, got, data_range=2.0) > END_TO_END_MIN_PSNR["bf16"]
    x = be.from_numpy(noise)
    t = be.from_numpy(np.full(3, 0.3, np.float32))
    y = be.from_numpy(labels)
    hidden = be.dit_hidden(x, t, y)
    cond = be.refresh_condition(hidden, t)
    assert cond.dtype == torch.float32 and be.to_numpy(cond).shape == (3, 4, 64)
    assert torch.allclose(cond, be.dit(x, t, y))
    assert be.to_numpy(be.decoder(x, cond)).dtype == np.float32
    assert be.concat([x, x]).shape[0] == 6
    assert be.describe()["precision"] == "bf16"
    be.close()


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_steps_match_pytorch(model, compile):
    cfg = SamplerConfig(num_steps=12, guidance=3.0, guidance_interval=(0.3, 1.0))
    noise, labels = _noise(3), np.array([1, 2, NULL])
    reference = sample(TorchBackend(model), noise, labels, cfg, null_class=NULL)
    be = CudaGraphBackend(model, precision="bf16", compile=compile)
    try:
        first = sample(be, noise, labels, cfg, null_class=NULL)
        again = sample(be, noise, labels, cfg, null_class=NULL)  # graph replays only
        unfused = sample(be, noise, labels, cfg, null_class=NULL, fused_step=False)
        assert all(set(b.runners) == {True, False} for b in be._buckets.values())
    finally:
        be.close()
    assert np.array_equal(first, again)
    assert psnr(reference, first, data_range=2.0) > END_TO_END_MIN_PSNR["bf16"]
    assert psnr(unfused, first, data_range=2.0) > END_TO_END_MIN_PSNR["bf16"]


@gpu
@pytest.mark.gpu
def test_cuda_graph_steps_fp32_equal_eager_on_the_gpu(model):
    cfg = SamplerConfig(num_steps=8, guidance=2.0, guidance_interval=(0.2, 1.0))
    noise, labels = _noise(2), np.array([4, 5])
    eager = sample(TorchBackend(model, device="cuda"), noise, labels, cfg, null_class=NULL)
    be = CudaGraphBackend(model, precision="fp32", compile=False)
    try:
        graphed = sample(be, noise, labels, cfg, null_class=NULL)
    finally:
        be.close()
    assert np.abs(graphed - eager).max() < 1e-4


@pytest.mark.parametrize("cfg_mode", ["fast", "reference"])
def test_text_to_image_fused_steps_embed_the_text_once(golden_t2i_model, golden_t2i, cfg_mode):
    """A text-to-image model: the text is embedded once per generation (embed_text), the
    buckets hold (B, L, D) text tokens, and the fused Euler steps equal the sampler's unfused
    path and the PyTorch backend."""
    be = CudaGraphBackend(golden_t2i_model, device="cpu", precision="fp32", compile=False,
                          allow_cpu=True)
    assert be.supports_text_embedding
    calls = []
    embed = be.embed_text

    def counted(text):
        calls.append(text.shape)
        return embed(text)

    be.embed_text = counted
    cfg = SamplerConfig(num_steps=6, guidance=4.0, guidance_interval=(0.0, 1.0),
                        guidance_bounds="()", cfg_mode=cfg_mode, shift=3.0)
    text, neg, noise = golden_t2i["cond_text"], golden_t2i["uncond_text"], golden_t2i["noise"]
    fused = sample(be, noise, text, cfg, uncond=neg)
    assert calls == [(2 * len(text), *text.shape[1:])]
    bucket = next(iter(be._buckets.values()))
    assert bucket.y2.shape == (2 * len(text), 8, golden_t2i_model.config.hidden_size)
    unfused = sample(be, noise, text, cfg, uncond=neg, fused_step=False)
    reference = sample(TorchBackend(golden_t2i_model), noise, text, cfg, uncond=neg)
    assert np.array_equal(fused, unfused)
    assert np.abs(fused - reference).max() < 1e-5
