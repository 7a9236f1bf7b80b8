"""The decoder split for DiT sharing: the condition part and the pixel part of `PixelDecoder`,
their graph modules against the records, and the PyTorch backends that run them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtimes
from deco_export.backends.cuda_backend import CudaGraphBackend
from deco_export.backends.torch_backend import TorchBackend
from deco_export.export.graphs import GRAPH_CLASSES, example_inputs, reference_outputs
from runtimes.graphs import get_graph


def test_the_condition_part_is_the_per_pixel_condition_of_every_block(golden_model):
    x_t, cond = example_inputs(golden_model, "decoder", 3, 64, 64, seed=1)
    dec = golden_model.decoder
    with torch.no_grad():
        modulation = dec.modulation(cond)
        # Pixel k of token l reads cond_embed's features [k d, (k + 1) d) of that token.
        per_token = torch.nn.functional.silu(dec.cond_embed(cond))  # (B, L, p*p*d)
        assert torch.equal(modulation[:, 5, 7], per_token[:, 5, 7 * 32:8 * 32])
        assert torch.equal(dec.pixels(x_t, modulation), dec(x_t, cond))
        blocks_only = dec.pixels(x_t, torch.zeros_like(modulation))
    assert not torch.equal(blocks_only, dec(x_t, cond))  # the pixel part does read it
    spec = get_graph("decoder_cond").outputs[0].resolve(
        {"batch": 3, "tokens": 16, "patch_pixels": 256, "decoder_hidden": 32})
    assert list(modulation.shape) == spec.shape


def test_graph_modules_follow_the_records(golden_model):
    for graph in ("decoder_cond", "decoder_pixel"):
        inputs = example_inputs(golden_model, graph, 2, 64, 64)
        assert len(inputs) == len(get_graph(graph).input_names)
        (out,) = reference_outputs(golden_model, graph, inputs)
        assert out.dtype == torch.float32
    x_t, modulation = example_inputs(golden_model, "decoder_pixel", 2, 64, 64)
    x_same, cond = example_inputs(golden_model, "decoder", 2, 64, 64)
    assert torch.equal(x_t, x_same)
    with torch.no_grad():
        fused = GRAPH_CLASSES["decoder"](golden_model)(x_t, cond)
        split = GRAPH_CLASSES["decoder_pixel"](golden_model)(x_t, modulation)
    assert torch.equal(fused, split)


@pytest.mark.parametrize("backend", ["torch", "torch-cuda"])
def test_torch_backends_run_reused_steps_on_the_cached_modulation(golden_model, golden, backend):
    if backend == "torch":
        be = TorchBackend(golden_model, device="cpu")
    else:  # the CUDA backend's bookkeeping on the CPU, in fp32 (no graphs, no compile)
        be = CudaGraphBackend(golden_model, device="cpu", precision="fp32", compile=False,
                              allow_cpu=True)
    assert runtimes.backend.supports_decoder_split(be)
    x = be.from_numpy(golden["noise"])
    t = be.from_numpy(np.full(len(x), 0.3, np.float32))
    cond = be.dit(x, t, be.from_numpy(golden["labels"].astype(np.int64)))
    torch.testing.assert_close(be.decoder_pixel(x, be.decoder_cond(cond)), be.decoder(x, cond),
                               rtol=0, atol=1e-6)
    pipe = runtimes.DeCoPipeline(be, golden_model.config)
    kwargs = dict(class_labels=golden["labels"].tolist(), steps=12, guidance=3.2,
                  guidance_interval=(0.1, 1.0), noise=golden["noise"], output_type="np",
                  fused_step=False)
    split = pipe.generate(**kwargs, sharing=0.5)
    fused = pipe.generate(**kwargs, sharing=0.5, decoder_split=False)
    assert split.cost.decoder_cond_samples < split.cost.decoder_samples
    np.testing.assert_allclose(split.images, fused.images, atol=1e-5)
    plain = pipe.generate(**kwargs)
    assert plain.cost.decoder_cond_samples is None
    assert np.array_equal(plain.images, pipe.generate(**kwargs, decoder_split=False).images)
