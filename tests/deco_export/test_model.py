"""The model against the reference: golden tensors, released sizes, and a reference-form forward
(unfold/fold, complex RoPE, concatenated DCT features) at non-square sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deco_export import DeCo, ModelConfig, get_preset
from deco_export.config import PRESETS
from deco_export.layers import length, linspace
from deco_export.model import patchify, unpatchify


def test_golden_forward(golden, golden_model):
    x, t, y = (torch.from_numpy(golden[k]) for k in ("x", "t", "y"))
    with torch.no_grad():
        cond, hidden = golden_model.dit(x, t, y)
        v = golden_model.decoder(x, cond)
        v_full = golden_model(x, t, y)
    assert np.abs(hidden.numpy() - golden["dit_hidden"]).max() < 1e-4
    assert np.abs(cond.numpy() - golden["dit_cond"]).max() < 1e-4
    assert np.abs(v.numpy() - golden["v"]).max() < 1e-4
    assert torch.equal(v, v_full)


def test_golden_config_matches_fixture(golden_meta, golden_model):
    cfg = golden_model.config
    for key, value in golden_meta["model"].items():
        assert getattr(cfg, key) == value
    assert len(golden_model.state_dict()) == golden_meta["n_tensors_per_copy"]


def test_released_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        assert DeCo(get_preset("DeCo-XL/16")).num_parameters() == 682_282_851
        assert DeCo(get_preset("DeCo-L/16")).num_parameters() == 426_938_019
    assert get_preset("DeCo-XL/16").mlp_hidden_size == 3072
    assert get_preset("DeCo-L/16").mlp_hidden_size == 2730


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=65, num_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(hidden_size=64, num_heads=4, image_size=(60, 64))
    with pytest.raises(ValueError, match="unknown DeCo config keys"):
        ModelConfig.from_dict({"hidden": 3})


@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (1, 3, 64, 16), (3, 1, 16, 16)])
def test_patchify_matches_unfold(shape):
    x = torch.randn(shape)
    p = 16 if shape[-1] % 16 == 0 and shape[-2] % 16 == 0 else 8
    b, c, h, w = shape
    patches = patchify(x, p)  # (B, C, L, p*p)
    ref = F.unfold(x, kernel_size=p, stride=p)  # (B, C*p*p, L), channel-major
    assert torch.equal(patches.permute(0, 2, 1, 3).reshape(b, -1, c * p * p), ref.transpose(1, 2))
    assert torch.equal(unpatchify(patches, p, h, w), x)


@pytest.mark.parametrize("end", [16.0, 3.0, 7.0, 64.0])
def test_linspace_from_arange_is_torch_linspace_to_the_last_bit(end):
    """The in-graph positions: the kernel's formula, at most one ulp from torch.linspace (which
    fuses the second half's multiply-add), exact where PyTorch computes i * step."""
    for n in range(1, 80):
        ours, theirs = linspace(end, n), torch.linspace(0, end, n)
        assert ours.dtype == torch.float32 and ours.shape == (n,)
        ulp = torch.finfo(torch.float32).eps * end
        assert (ours - theirs).abs().max() <= ulp
        assert torch.equal(ours[: max(n // 2, 1)], theirs[: max(n // 2, 1)])
    assert torch.equal(linspace(length(5), 3), torch.tensor([0.0, 2.5, 5.0]))


# --- a literal transcription of the reference forward, used only as a test oracle -------------


def _reference_rope(dim: int, height: int, width: int) -> torch.Tensor:
    x_pos = torch.linspace(0, 16, width)
    y_pos = torch.linspace(0, 16, height)
    y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
    y_pos, x_pos = y_pos.reshape(-1), x_pos.reshape(-1)
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    x_cis = torch.polar(torch.ones(len(x_pos), len(freqs)), torch.outer(x_pos, freqs))
    y_cis = torch.polar(torch.ones(len(y_pos), len(freqs)), torch.outer(y_pos, freqs))
    return torch.cat([x_cis.unsqueeze(-1), y_cis.unsqueeze(-1)], dim=-1).reshape(height * width, -1)


def _reference_apply_rope(xq: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[None, :, None, :]
    return torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)


def _reference_forward(model: DeCo, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    cfg = model.config
    dit, dec = model.dit, model.decoder
    b, c, h, w = x.shape
    p = cfg.patch_size
    pos = _reference_rope(cfg.head_dim, h // p, w // p)
    x_patch = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
    s = dit.s_embedder.proj(x_patch)
    half = 128
    freqs = torch.exp(-math.log(10) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    e_t = dit.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)).view(b, 1, -1)
    c_vec = F.silu(e_t + dit.y_embedder.embedding_table(y).view(b, 1, -1))
    for blk in dit.blocks:
        mods = blk.adaLN_modulation(c_vec).chunk(6, dim=-1)
        hn = blk.norm1(s) * (1 + mods[1]) + mods[0]
        qkv = blk.attn.qkv(hn).reshape(b, -1, 3, cfg.num_heads, cfg.head_dim).permute(2, 0, 1, 3, 4)
        q, k, v = blk.attn.q_norm(qkv[0]), blk.attn.k_norm(qkv[1]), qkv[2]
        q, k = _reference_apply_rope(q, pos), _reference_apply_rope(k, pos)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v)
        s = s + mods[2] * blk.attn.proj(att.transpose(1, 2).reshape(b, -1, cfg.hidden_size))
        hn = blk.norm2(s) * (1 + mods[4]) + mods[3]
        s = s + mods[5] * blk.mlp(hn)
    hidden = s
    s = F.silu(e_t + s)
    L = s.shape[1]
    xp = x_patch.reshape(b * L, c, p * p).transpose(1, 2)
    dct = dec.x_embedder.dct.unsqueeze(0).repeat(b * L, 1, 1)
    z = dec.x_embedder.embedder(torch.cat([xp, dct], dim=-1))
    z = dec.input_proj(z)
    cond = dec.cond_embed(s.reshape(b * L, -1)).reshape(b * L, p * p, -1)
    for blk in dec.res_blocks:
        shift, scale, gate = blk.adaLN_modulation(cond).chunk(3, dim=-1)
        z = z + gate * blk.mlp(blk.in_ln(z) * (1 + scale) + shift)
    out = dec.final_layer(z).transpose(1, 2).reshape(b, L, -1).transpose(1, 2)
    return F.fold(out, (h, w), kernel_size=p, stride=p), hidden


@pytest.mark.parametrize("size", [(32, 80), (80, 48), (64, 64)])
def test_non_square_matches_reference_form(golden_model, size):
    torch.manual_seed(0)
    h, w = size
    x = torch.randn(2, 3, h, w)
    t = torch.rand(2)
    y = torch.tensor([3, 10])
    with torch.no_grad():
        v = golden_model(x, t, y)
        v_ref, hidden_ref = _reference_forward(golden_model, x, t, y)
        _, hidden = golden_model.dit(x, t, y)
    assert (v - v_ref).abs().max() < 1e-5
    assert (hidden - hidden_ref).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["DeCo-XS/4", "DeCo-XS/8"])
def test_small_presets_run_and_keep_rank(preset):
    cfg = get_preset(preset)
    model = DeCo(cfg).eval()
    h, w = cfg.image_size
    with torch.no_grad():
        v = model(torch.randn(2, 3, h, w), torch.rand(2), torch.tensor([0, cfg.null_class]))
    assert v.shape == (2, 3, h, w)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def test_refresh_condition_matches_dit(golden, golden_model):
    x, t, y = (torch.from_numpy(golden[k]) for k in ("x", "t", "y"))
    with torch.no_grad():
        cond, hidden = golden_model.dit(x, t, y)
        assert torch.allclose(golden_model.dit.refresh_condition(hidden, t), cond)


def test_the_old_config_name_still_imports_with_a_deprecation_warning():
    import deco_export
    from runtimes.config import ModelConfig

    with pytest.warns(DeprecationWarning, match="DeCoConfig is runtimes.config.ModelConfig"):
        from deco_export.config import DeCoConfig
    assert DeCoConfig is ModelConfig
    with pytest.warns(DeprecationWarning):
        assert deco_export.DeCoConfig is ModelConfig
    assert deco_export.ModelConfig is ModelConfig


def test_random_model_draws_the_zeroed_output_layers_so_images_are_not_zero():
    from deco_export.model import random_model

    config = get_preset("DeCo-tiny/16")
    a, b = random_model(config, seed=3), random_model(config, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert all(p.abs().sum() > 0 for p in a.parameters())  # no output layer left at zero
    x = torch.randn(1, 3, 64, 64)
    v = a(x, torch.tensor([0.5]), torch.tensor([1]))
    assert v.abs().mean() > 0
