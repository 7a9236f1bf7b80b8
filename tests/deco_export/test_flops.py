"""The analytic FLOP counts against PyTorch's own counter (FlopCounterMode) on small models:
each graph, the decoder's two parts, and a whole guided generation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import runtimes
from deco_export import DeCo, get_preset
from deco_export.backends.torch_backend import TorchBackend
from deco_export.flops import graph_flops, sampling_flops


def counted(fn, *args) -> int:
    # The math attention kernel is a pair of batched matmuls the counter sees; the fused CPU
    # kernel is invisible to it.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn(*args)
    return fc.get_total_flops()


def profiled_generation(pipe, kwargs):
    """The output of ``pipe.generate(**kwargs)`` and the FLOPs the profiler counts in a second,
    identical run."""
    out = pipe.generate(**kwargs)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        pipe.generate(**kwargs)
    return out, fc.get_total_flops()


@pytest.fixture(scope="module", params=["DeCo-tiny/16", "DeCo-XS/4"])
def model(request):
    torch.manual_seed(0)
    return DeCo(get_preset(request.param, num_classes=7)).eval()


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (3, 32, 48)])
def test_each_graph_matches_the_profiler(model, batch, height, width):
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, height, width)
    t, y = torch.rand(batch), torch.randint(0, cfg.num_classes + 1, (batch,))
    with torch.no_grad():
        cond, hidden = model.dit(x, t, y)
    assert counted(model.dit, x, t, y) == graph_flops(cfg, "dit", batch, height, width)
    assert counted(model.decoder, x, cond) == graph_flops(cfg, "decoder", batch, height, width)
    assert counted(model.dit.refresh_condition, hidden, t) == graph_flops(
        cfg, "refresh", batch, height, width)


def test_decoder_parts_add_up_and_match_the_profiler(model):
    cfg, dec = model.config, model.decoder
    batch, h, w = 2, 64, 64
    cond = torch.randn(batch, cfg.num_tokens(h, w), cfg.hidden_size)

    x = torch.randn(batch, cfg.in_channels, h, w)
    with torch.no_grad():
        modulation = dec.modulation(cond)
    assert counted(dec.modulation, cond) == graph_flops(cfg, "decoder_cond", batch, h, w)
    assert counted(dec.pixels, x, modulation) == graph_flops(cfg, "decoder_pixel", batch, h, w)
    assert (graph_flops(cfg, "decoder_cond", batch, h, w)
            + graph_flops(cfg, "decoder_pixel", batch, h, w)
            == graph_flops(cfg, "decoder", batch, h, w))


def test_a_guided_generation_matches_the_profiler(model):
    cfg = model.config
    h, w = (64, 64) if cfg.patch_size == 16 else (32, 32)
    pipe = runtimes.DeCoPipeline(TorchBackend(model), cfg.to_dict())
    kwargs = dict(class_labels=[1, 2], steps=3, guidance=3.0, guidance_interval=(0.4, 1.0),
                  seed=0, output_type="np", height=h, width=w)
    out, flops = profiled_generation(pipe, kwargs)
    assert np.isfinite(np.asarray(out.images)).all()
    assert out.cost.dit_samples > out.cost.steps * 2  # some steps ran both CFG halves
    assert flops == sampling_flops(cfg, out.cost, h, w)


def test_a_shared_generation_with_the_split_decoder_matches_the_profiler(model):
    cfg = model.config
    h, w = (64, 64) if cfg.patch_size == 16 else (32, 32)
    pipe = runtimes.DeCoPipeline(TorchBackend(model), cfg.to_dict())
    kwargs = dict(class_labels=[1, 2], steps=6, guidance=3.0, guidance_interval=(0.4, 1.0),
                  seed=0, output_type="np", height=h, width=w, sharing=0.5)
    out, flops = profiled_generation(pipe, kwargs)
    cond_samples = out.cost.decoder_cond_samples
    assert cond_samples < out.cost.decoder_samples
    assert flops == sampling_flops(cfg, out.cost, h, w)


def test_a_distilled_generation_matches_the_profiler(model):
    """A guidance-distilled model: its DiT's guidance embedding is counted, and a guided
    generation runs one conditional pass per step (B rows, never 2B)."""
    cfg = dataclasses.replace(model.config, guidance_distilled=True)
    torch.manual_seed(0)
    student = DeCo(cfg).eval()
    h, w = (64, 64) if cfg.patch_size == 16 else (32, 32)
    x, t = torch.randn(2, cfg.in_channels, h, w), torch.rand(2)
    y, g = torch.tensor([1, 2]), torch.tensor([3.0, 1.0])
    assert counted(student.dit, x, t, y, g) == graph_flops(cfg, "dit", 2, h, w)
    assert graph_flops(cfg, "dit", 2, h, w) > graph_flops(model.config, "dit", 2, h, w)
    pipe = runtimes.DeCoPipeline(TorchBackend(student), cfg.to_dict())
    kwargs = dict(class_labels=[1, 2], steps=3, guidance=3.0, guidance_interval=(0.4, 1.0),
                  seed=0, output_type="np", height=h, width=w)
    out, flops = profiled_generation(pipe, kwargs)
    assert out.cost.dit_samples == out.cost.decoder_samples == 2 * out.cost.steps
    assert flops == sampling_flops(cfg, out.cost, h, w)


def test_cond_embed_is_a_large_part_of_the_decoder_at_s16():
    cfg = get_preset("DeCo-S/16", hidden_size=384, num_heads=6, dit_depth=12)
    share = graph_flops(cfg, "decoder_cond", 1, 256, 256) / graph_flops(cfg, "decoder", 1, 256,
                                                                         256)
    assert 0.35 < share < 0.5


def test_counts_read_a_runtime_manifest_config_and_refuse_bad_input(model):
    cfg = model.config
    as_dict = runtimes.ModelConfig.from_dict(cfg.to_dict())
    assert graph_flops(as_dict, "dit", 2, 64, 64) == graph_flops(cfg, "dit", 2, 64, 64)
    with pytest.raises(ValueError, match="unknown graph 'vae'"):
        graph_flops(cfg, "vae", 1, 64, 64)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        graph_flops(cfg, "dit", 1, 65, 64)
