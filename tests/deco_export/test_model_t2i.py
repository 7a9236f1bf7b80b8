"""The text-to-image model against the reference: golden tensors, the released size, the AB2
sampler, and a reference-form forward (unfold/fold, complex RoPE in the reference's
(B, heads, N, hd) layout, concatenated pixel features) at non-square sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deco_export
from deco_export import DeCo, ModelConfig, get_preset
from deco_export.backends.torch_backend import TorchBackend
from deco_export.checkpoint import CheckpointError, load_reference, save_pretrained
from runtimes.sampler import SamplerConfig, make_plan, sample


def test_golden_forward(golden_t2i, golden_t2i_model):
    x, t, text = (torch.from_numpy(golden_t2i[k]) for k in ("x", "t", "text"))
    with torch.no_grad():
        v = golden_t2i_model(x, t, text)
    assert np.abs(v.numpy() - golden_t2i["v"]).max() < 1e-4


def test_golden_config_is_read_from_the_keys(golden_t2i_meta, golden_t2i_model):
    cfg = golden_t2i_model.config
    assert cfg.family == "t2i"
    assert (cfg.hidden_size, cfg.num_heads, cfg.dit_depth) == (64, 4, 2)
    assert (cfg.refine_depth, cfg.text_dim, cfg.text_len) == (
        golden_t2i_meta["text_blocks"], golden_t2i_meta["txt_embed_dim"],
        golden_t2i_meta["txt_max_length"],
    )
    assert cfg == get_preset("DeCo-T2I-tiny/16")
    assert len(golden_t2i_model.state_dict()) == golden_t2i_meta["n_tensors"]


@pytest.mark.parametrize("cfg_mode", ["reference", "fast"])
def test_golden_ab2_sample(golden_t2i, golden_t2i_model, golden_t2i_meta, cfg_mode):
    config = SamplerConfig(
        solver="ab2", num_steps=golden_t2i_meta["steps"], shift=golden_t2i_meta["shift"],
        guidance=golden_t2i_meta["guidance"], guidance_interval=(0.0, 1.0),
        accumulate_time=True, cfg_mode=cfg_mode,
    )
    x = sample(TorchBackend(golden_t2i_model), golden_t2i["noise"], golden_t2i["cond_text"],
               config, uncond=golden_t2i["uncond_text"])
    assert np.abs(x - golden_t2i["sample"]).max() < 1e-4


def test_release_sampler_leaves_only_the_first_step_unguided():
    plan = make_plan(SamplerConfig(solver="ab2", num_steps=25, shift=3.0, guidance=4.0,
                                   guidance_interval=(0.0, 1.0), accumulate_time=True))
    assert [ev.guided for ev in plan.evaluations] == [False] + [True] * 24


def test_sampler_takes_one_unconditional_row(golden_t2i, golden_t2i_model):
    config = SamplerConfig(solver="ab2", num_steps=3, shift=3.0, guidance=4.0)
    backend = TorchBackend(golden_t2i_model)
    uncond = golden_t2i["uncond_text"][:1]
    one = sample(backend, golden_t2i["noise"], golden_t2i["cond_text"], config, uncond=uncond)
    tiled = sample(backend, golden_t2i["noise"], golden_t2i["cond_text"], config,
                   uncond=np.repeat(uncond, 2, axis=0))
    assert np.array_equal(one, tiled)
    with pytest.raises(ValueError, match="one of the two"):
        sample(backend, golden_t2i["noise"], golden_t2i["cond_text"], config)
    with pytest.raises(ValueError, match="unconditional embeddings must be"):
        sample(backend, golden_t2i["noise"], golden_t2i["cond_text"], config,
               uncond=golden_t2i["uncond_text"][:, :4])


def test_released_parameter_count_on_meta():
    cfg = get_preset("DeCo-T2I")
    assert cfg.mlp_hidden_size == 6144 and cfg.head_dim == 64
    with torch.device("meta"):
        model = DeCo(cfg)
    assert model.num_parameters() == 1_133_759_395
    state = model.state_dict()
    assert state["dit.blocks.0.attn.qkv_x.weight"].shape == (4608, 1536)
    assert state["dit.blocks.0.attn.kv_y.weight"].shape == (3072, 1536)
    assert state["dit.y_pos_embedding"].shape == (1, 128, 1536)
    assert state["dit.blocks.15.mlp.w12.weight"].shape == (12288, 1536)


def test_config_fields_and_serialisation():
    cfg = get_preset("DeCo-T2I")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert cfg.to_dict()["family"] == "t2i" and cfg.to_dict()["refine_depth"] == 4
    c2i = get_preset("DeCo-XL/16").to_dict()
    assert not {"family", "text_len", "text_dim", "refine_depth"} & set(c2i)
    with pytest.raises(ValueError, match="text_len and text_dim"):
        ModelConfig(hidden_size=64, num_heads=4, family="t2i")
    with pytest.raises(ValueError, match="t2i"):
        ModelConfig(hidden_size=64, num_heads=4, text_len=8)
    with pytest.raises(ValueError, match="family must be"):
        ModelConfig(family="t2v")


def test_text_shape_is_checked(golden_t2i_model):
    with pytest.raises(ValueError, match=r"text embeddings must be \(B, 8, 48\)"):
        golden_t2i_model(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, 7, 48))


def test_load_model_returns_either_family(tmp_path, golden_t2i_ckpt, golden_ckpt, golden_t2i):
    t2i = deco_export.load_model(golden_t2i_ckpt)
    assert t2i.config.family == "t2i" and t2i.config.image_size == (512, 512)
    assert deco_export.load_model(golden_ckpt).config.family == "c2i"
    saved = save_pretrained(t2i, tmp_path / "ours")
    again = deco_export.load_model(saved)
    assert again.config == t2i.config
    x, t, text = (torch.from_numpy(golden_t2i[k]) for k in ("x", "t", "text"))
    with torch.no_grad():
        assert torch.equal(again(x, t, text), t2i(x, t, text))


def test_online_weights_and_strict_listing(tmp_path, golden_t2i_ckpt):
    ckpt = torch.load(golden_t2i_ckpt, weights_only=True)
    state = dict(ckpt["state_dict"])
    with pytest.raises(CheckpointError, match="no 'denoiser"):
        load_reference(golden_t2i_ckpt, weights="online")
    state.pop("ema_denoiser.blocks.1.attn.kv_y.weight")
    state["ema_denoiser.text_refine_blocks.0.attn.extra"] = torch.zeros(3)
    state["ema_denoiser.blocks.0.mlp.w3.weight"] = torch.zeros(64, 255)
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(CheckpointError) as err:
        load_reference(bad)
    text = str(err.value)
    assert "missing dit.blocks.1.attn.kv_y.weight" in text
    assert "unexpected dit.text_refine_blocks.0.attn.extra" in text
    assert "mis-shaped dit.blocks.0.mlp.w3.weight: checkpoint (64, 255)" in text


# --- a literal transcription of the reference T2I forward, used only as a test oracle ---------


def _reference_freqs_cis_ex2d(dim: int, height: int, width: int) -> torch.Tensor:
    x_pos = torch.linspace(0, height, width)
    y_pos = torch.linspace(0, width, height)
    y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
    y_pos, x_pos = y_pos.reshape(-1), x_pos.reshape(-1)
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    x_cis = torch.polar(torch.ones(len(x_pos), len(freqs)), torch.outer(x_pos, freqs))
    y_cis = torch.polar(torch.ones(len(y_pos), len(freqs)), torch.outer(y_pos, freqs))
    return torch.cat([x_cis.unsqueeze(-1), y_cis.unsqueeze(-1)], dim=-1).reshape(height * width, -1)


def _reference_rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (B, heads, N, hd): the table broadcasts over batch and heads."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis[None, None]).flatten(3).type_as(x)


def _heads(z: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    b, n, _ = z.shape
    return z.reshape(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4)


def _reference_block(blk, x, c, heads, y=None, pos=None):
    mods = blk.adaLN_modulation(c).chunk(6, dim=-1)
    hn = blk.norm1(x) * (1 + mods[1]) + mods[0]
    b, n, d = hn.shape
    if y is None:
        q, k, v = _heads(blk.attn.qkv(hn), 3, heads)
        q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
    else:
        q, kx, vx = _heads(blk.attn.qkv_x(hn), 3, heads)
        q, kx = blk.attn.q_norm(q), blk.attn.k_norm(kx)
        q, kx = _reference_rotate(q, pos), _reference_rotate(kx, pos)
        ky, vy = _heads(blk.attn.kv_y(y), 2, heads)
        k = torch.cat([kx, blk.attn.k_norm(ky)], dim=2)
        v = torch.cat([vx, vy], dim=2)
    att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + mods[2] * blk.attn.proj(att)
    hn = blk.norm2(x) * (1 + mods[4]) + mods[3]
    x1, x2 = blk.mlp.w12(hn).chunk(2, dim=-1)
    return x + mods[5] * blk.mlp.w3(F.silu(x1) * x2)


def _reference_forward(model: DeCo, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
    cfg = model.config
    dit, dec = model.dit, model.decoder
    b, c, h, w = x.shape
    p = cfg.patch_size
    x_patch = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
    pos = _reference_freqs_cis_ex2d(cfg.head_dim, h // p, w // p)
    freqs = torch.exp(-math.log(10) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    e_t = dit.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)).view(b, 1, -1)
    y = dit.y_embedder.norm(dit.y_embedder.proj(text)) + dit.y_pos_embedding
    condition = F.silu(e_t)
    for blk in dit.text_refine_blocks:
        y = _reference_block(blk, y, condition, cfg.num_heads)
    s = dit.s_embedder.proj(x_patch)
    for blk in dit.blocks:
        s = _reference_block(blk, s, condition, cfg.num_heads, y=y, pos=pos)
    hidden = s
    s = F.silu(e_t + s)
    L = s.shape[1]
    xp = x_patch.reshape(b * L, c, p * p).transpose(1, 2)
    table = _reference_freqs_cis_ex2d(128, p, p)[None].repeat(b * L, 1, 1)
    z = dec.x_embedder.embedder(torch.cat([xp, table.real.float()], dim=-1))
    z = dec.input_proj(z)
    cond = dec.cond_embed(s.reshape(b * L, -1)).reshape(b * L, p * p, -1)
    for blk in dec.res_blocks:
        shift, scale, gate = blk.adaLN_modulation(cond).chunk(3, dim=-1)
        z = z + gate * blk.mlp(blk.in_ln(z) * (1 + scale) + shift)
    out = dec.final_layer(z).transpose(1, 2).reshape(b, L, -1).transpose(1, 2)
    return F.fold(out, (h, w), kernel_size=p, stride=p), hidden


@pytest.mark.parametrize("size", [(32, 80), (80, 48), (64, 64)])
def test_non_square_matches_reference_form(golden_t2i_model, size):
    torch.manual_seed(0)
    h, w = size
    x = torch.randn(2, 3, h, w)
    t = torch.rand(2)
    text = torch.randn(2, 8, 48)
    with torch.no_grad():
        v = golden_t2i_model(x, t, text)
        v_ref, hidden_ref = _reference_forward(golden_t2i_model, x, t, text)
        _, hidden = golden_t2i_model.dit(x, t, text)
    assert (v - v_ref).abs().max() < 1e-5
    assert (hidden - hidden_ref).abs().max() < 1e-5


def test_crossed_rope_spans_show_only_off_square(golden_t2i_model, monkeypatch):
    """With the spans uncrossed (x over W, y over H) a non-square forward changes, a square one
    does not: the test above would catch the swap."""
    from deco_export import model_t2i

    torch.manual_seed(1)
    x, t, text = torch.randn(1, 3, 32, 80), torch.rand(1), torch.randn(1, 8, 48)

    def uncrossed(grid_h, grid_w, head_dim, device, theta=10000.0):
        x_pos = torch.linspace(0, grid_w, grid_w)
        y_pos = torch.linspace(0, grid_h, grid_h)
        y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
        return model_t2i.rope_from_positions(x_pos, y_pos, head_dim, theta)

    with torch.no_grad():
        v = golden_t2i_model(x, t, text)
        sq = golden_t2i_model(x[..., :32], t, text)
        monkeypatch.setattr(model_t2i, "t2i_rope_tables", uncrossed)
        v_swapped = golden_t2i_model(x, t, text)
        sq_swapped = golden_t2i_model(x[..., :32], t, text)
    assert (v - v_swapped).abs().max() > 1e-4
    assert torch.equal(sq, sq_swapped)


@pytest.mark.parametrize("preset", ["DeCo-T2I-tiny/16", "DeCo-T2I-S/8"])
def test_small_presets_run(preset):
    cfg = get_preset(preset)
    model = DeCo(cfg).eval()
    h, w = cfg.image_size
    with torch.no_grad():
        v = model(torch.randn(2, 3, h, w), torch.rand(2), torch.randn(2, cfg.text_len,
                                                                        cfg.text_dim))
    assert v.shape == (2, 3, h, w)


def test_refresh_condition_and_embedded_forward(golden_t2i, golden_t2i_model):
    x, t, text = (torch.from_numpy(golden_t2i[k]) for k in ("x", "t", "text"))
    dit = golden_t2i_model.dit
    with torch.no_grad():
        cond, hidden = dit(x, t, text)
        assert torch.allclose(dit.refresh_condition(hidden, t), cond)
        again, _ = dit.forward_embedded(x, t, dit.embed_text(text))
    assert torch.equal(again, cond)


def test_convert_cli_detects_the_family_and_takes_ema(tmp_path, golden_t2i_ckpt, golden_t2i):
    from click.testing import CliRunner

    from deco_export.cli import main

    ckpt = torch.load(golden_t2i_ckpt, weights_only=True)
    state = dict(ckpt["state_dict"])
    for key in list(state):  # an online copy that differs from the EMA one
        state["denoiser." + key[len("ema_denoiser."):]] = state[key] * 0.9
    both = tmp_path / "t2i_DeCo.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, both)
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert", str(both), str(out), "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert "parameters, ema weights" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "t2i" and config["text_len"] == 8
    assert config["image_size"] == [64, 64]
    model = deco_export.load_model(out)
    x, t, text = (torch.from_numpy(golden_t2i[k]) for k in ("x", "t", "text"))
    with torch.no_grad():
        v = model(x, t, text)
    assert np.abs(v.numpy() - golden_t2i["v"]).max() < 1e-4
    online = load_reference(both, weights="online")
    with torch.no_grad():
        assert (online(x, t, text) - v).abs().max() > 1e-2


@pytest.mark.parametrize("size", [(64, 64), (32, 80)])
def test_analytic_flops_match_the_profiler(golden_t2i_model, size):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from deco_export.flops import graph_flops

    h, w = size
    x, t, text = torch.randn(2, 3, h, w), torch.rand(2), torch.randn(2, 8, 48)
    dit, cfg = golden_t2i_model.dit, golden_t2i_model.config

    def counted(fn, *args):
        counter = FlopCounterMode(display=False)
        # The math attention kernel is matmuls the counter sees; the fused CPU kernel is not.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            fn(*args)
        return counter.get_total_flops()

    with torch.no_grad():
        tokens = dit.embed_text(text)
    assert graph_flops(cfg, "text_embed", 2, h, w) == counted(dit.embed_text, text)
    assert graph_flops(cfg, "dit", 2, h, w) == counted(dit.forward_embedded, x, t, tokens)
    assert (graph_flops(cfg, "text_embed", 2, h, w) + graph_flops(cfg, "dit", 2, h, w)
            == counted(dit, x, t, text))  # the whole forward, as the reference runs it


def test_text_path_share_of_the_release():
    """The release's text path (refine blocks + text keys/values) is about 15 % of a forward at
    256x256 and 4 % at 512x512 (docs/benchmarks.md)."""
    from deco_export.flops import graph_flops

    cfg = get_preset("DeCo-T2I")
    no_text = ModelConfig(**{**cfg.to_dict(), "refine_depth": 0, "image_size": (512, 512)})
    for side, share in ((256, 0.151), (512, 0.040)):
        total = graph_flops(cfg, "dit", 1, side, side) + graph_flops(cfg, "decoder", 1, side, side)
        refine = graph_flops(cfg, "dit", 1, side, side) - graph_flops(no_text, "dit", 1, side,
                                                                          side)
        path = refine + 16 * 2 * 128 * 1536 * 2 * 1536  # + the text keys/values kv_y
        assert abs(path / total - share) < 0.002


def test_a_guided_generation_counts_the_text_embedding_once(golden_t2i_model, golden_t2i):
    """The profiler's count of a whole text-to-image generation through the PyTorch backend is
    the analytic count of its cost: the DiT and decoder per step, text_embed once on the 2B
    rows of [negative; prompts]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import runtimes
    from deco_export.backends.torch_backend import TorchBackend
    from deco_export.flops import sampling_flops

    cfg = golden_t2i_model.config
    pipe = runtimes.DeCoPipeline(TorchBackend(golden_t2i_model), cfg.to_dict())
    kwargs = dict(prompt_embeds=golden_t2i["cond_text"],
                  negative_prompt_embeds=golden_t2i["uncond_text"], steps=3, guidance=4.0,
                  seed=0, output_type="np", height=64, width=64)
    out = pipe.generate(**kwargs)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        pipe.generate(**kwargs)
    b = len(golden_t2i["cond_text"])
    assert out.cost.text_embed_calls == 1 and out.cost.text_embed_samples == 2 * b
    assert fc.get_total_flops() == sampling_flops(cfg, out.cost, 64, 64)
