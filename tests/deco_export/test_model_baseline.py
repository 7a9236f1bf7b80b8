"""The plain pixel DiT baseline (architecture="dit"): config, presets, shapes, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deco_export.config import baseline_of, baseline_preset, get_preset
from deco_export.flops import graph_flops, training_flops
from deco_export.model import DeCo, PixelDiT, build_model, patchify
from runtimes.config import ModelConfig


def test_presets_pair_each_deco_size_with_two_more_blocks():
    for name in ("DeCo-T/4", "DeCo-XL/16", "DeCo-L/16"):
        deco, dit = get_preset(name), get_preset(baseline_preset(name))
        assert dit.architecture == "dit" and deco.architecture == "deco"
        assert dit.dit_depth == deco.dit_depth + 2
        assert dit.hidden_size == deco.hidden_size and dit.patch_size == deco.patch_size
    assert baseline_preset("DiT-T/4") == "DiT-T/4"
    with pytest.raises(ValueError, match="no baseline"):
        baseline_preset("nope")
    with pytest.raises(ValueError, match="already a plain DiT"):
        baseline_of(get_preset("DiT-T/4"))


def test_architecture_is_serialised_only_when_not_the_default():
    deco = get_preset("DeCo-T/4")
    assert "architecture" not in deco.to_dict()  # existing config.json files stay identical
    dit = get_preset("DiT-T/4")
    assert dit.to_dict()["architecture"] == "dit"
    assert ModelConfig.from_json(dit.to_json()) == dit
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(architecture="unet")


@pytest.mark.parametrize("size", [(32, 32), (16, 24)])
def test_forward_shapes_and_zero_init(size):
    torch.manual_seed(0)
    model = build_model(get_preset("DiT-T/4"))
    assert isinstance(model, PixelDiT)
    x = torch.randn(3, 3, *size)
    v = model(x, torch.rand(3), torch.tensor([0, 4, 9]))
    assert v.shape == x.shape
    # The final layer starts at zero, so the first prediction is v = 0, as in DiT.
    assert torch.count_nonzero(v) == 0


def test_final_layer_maps_each_token_to_its_own_patch():
    """Output channel c*p*p + ky*p + kx of token l lands on pixel (ky, kx) of patch l."""
    torch.manual_seed(0)
    model = build_model(get_preset("DiT-T/4")).eval()
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(torch.arange(48, dtype=torch.float32))
    v = model(torch.randn(1, 3, 8, 12), torch.rand(1), torch.tensor([1]))
    tokens = patchify(v, 4)  # (1, C, L, p*p)
    want = torch.arange(48, dtype=torch.float32).reshape(3, 16)
    assert torch.equal(tokens[0], want[:, None, :].expand(3, 6, 16))


def test_builders_refuse_the_other_architecture():
    with pytest.raises(ValueError, match="PixelDiT"):
        DeCo(get_preset("DiT-T/4"))
    with pytest.raises(ValueError, match="builds DeCo"):
        PixelDiT(get_preset("DeCo-T/4"))


def test_flops_match_at_equal_compute_and_count_blocks():
    deco, dit = get_preset("DeCo-T/4"), get_preset("DiT-T/4")
    deco_train, dit_train = training_flops(deco, 32, 32), training_flops(dit, 32, 32)
    assert abs(dit_train / deco_train - 1) < 0.1  # two DiT blocks cost about one decoder
    two_blocks = graph_flops(dit, "dit", 1, 32, 32) - graph_flops(deco, "dit", 1, 32, 32)
    # D = 128, 64 tokens, SwiGLU 341: qkv + proj + 3 FFN matmuls + attention + adaLN.
    block = 64 * (2 * 128 * 384 + 2 * 128 * 128 + 6 * 128 * 341) + 4 * 64 * 64 * 128 + 2 * 128 * 768
    assert two_blocks == 2 * block
    final = 2 * 128 * 256 + 64 * 2 * 128 * 48  # adaLN shift/scale + Linear(D -> p*p*3) per token
    assert graph_flops(dit, "pixel_dit", 1, 32, 32) == graph_flops(dit, "dit", 1, 32, 32) + final
    assert dit_train == 3 * graph_flops(dit, "pixel_dit", 1, 32, 32)


def test_model_matches_its_flop_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(get_preset("DiT-T/4")).eval()
    # The math attention kernel is a pair of matmuls the counter sees; the fused one is not.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1]))
    assert counter.get_total_flops() == graph_flops(model.config, "pixel_dit", 2, 32, 32)


@pytest.fixture(scope="module")
def baseline_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A small trained-looking baseline: random weights everywhere, final layer included. One
    block: every block exports and samples as the first does, and each more one costs the
    export's trace about 2 s."""
    torch.manual_seed(0)
    model = build_model(get_preset("DiT-tiny/16", num_classes=3, patch_size=4,
                                   image_size=(16, 16), dit_depth=1))
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "dit"
    model.save_pretrained(path)
    return path, model


def test_runtime_sampler_matches_the_training_sampler(baseline_checkpoint):
    """The runtime sampler on the one-graph torch backend = the training loop's Euler + CFG."""
    from deco_export.sampling import open_pipeline
    from training.sample import euler_sample

    path, model = baseline_checkpoint
    pipe = open_pipeline(str(path))
    assert pipe.backend.supports_velocity and not pipe.backend.supports_refresh
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = pipe.generate(class_labels=[0, 2], steps=6, guidance=3.0, guidance_interval=(0.1, 1.0),
                        noise=noise.numpy(), output_type="np")
    want = euler_sample(model.eval(), noise, torch.tensor([0, 2]), num_steps=6, cfg_scale=3.0)
    np.testing.assert_allclose(np.asarray(out.images), want.numpy(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one graph"):
        pipe.generate(class_labels=[1], steps=6, sharing=0.5)


def test_cli_sample_of_a_baseline_checkpoint(baseline_checkpoint, tmp_path):
    from click.testing import CliRunner

    from deco_export.cli import main

    path, _ = baseline_checkpoint
    out = tmp_path / "grid.png"
    res = CliRunner().invoke(main, ["sample", str(path), "--classes", "0,1,2", "--steps", "3",
                                    "--out", str(out), "--scale", "1", "--cols", "3"])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (48, 16)


def test_exports_one_onnx_graph_and_samples_through_onnx_runtime(baseline_checkpoint, tmp_path):
    """deco export onnx writes pixel_dit.onnx alone, gated; deco sample runs it on ORT and draws
    the image the torch backend draws from the same seed."""
    from click.testing import CliRunner

    from deco_export.cli import main
    from runtimes.bundle import read_manifest

    path, _ = baseline_checkpoint
    bundle = tmp_path / "bundle"
    runner = CliRunner()
    res = runner.invoke(main, ["export", "onnx", str(path), str(bundle), "--parity-steps", "3"])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(bundle)
    assert [(a.graph, a.file) for a in manifest.artifacts] == [("pixel_dit", "pixel_dit.onnx")]
    assert manifest.model.to_dict()["architecture"] == "dit"
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "pixel_dit.onnx"]
    grids = []
    for source in (bundle, path):
        out = tmp_path / f"{source.name}.png"
        res = runner.invoke(main, ["sample", str(source), "--classes", "0,2", "--steps", "4",
                                   "--seed", "3", "--out", str(out)])
        assert res.exit_code == 0, res.output
        grids.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(grids[0] - grids[1]).max() <= 1  # fp32 ORT vs eager: at most one grey level
    res = runner.invoke(main, ["sample", str(bundle), "--classes", "0", "--steps", "4",
                               "--sharing", "0.5", "--out", str(tmp_path / "s.png")])
    assert res.exit_code != 0 and "one graph" in res.output
