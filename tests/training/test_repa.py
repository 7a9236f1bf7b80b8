"""REPA: reference head layout, loss, encoder input preparation, DINOv2 state-dict layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.repa import (
    DINOv2,
    FeatureHook,
    FrozenEncoder,
    ProjectionHead,
    load_encoder,
    repa_loss,
)


def test_head_round_trips_reference_keys(golden_ckpt):
    state = torch.load(golden_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    head = ProjectionHead.from_reference_state_dict(state)
    ref = {k: v for k, v in state.items() if k.startswith("diffusion_trainer.proj.")}
    assert sorted(ref) == sorted(
        f"diffusion_trainer.proj.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    )
    out = head.reference_state_dict()
    assert out.keys() == ref.keys()
    for k in ref:
        assert torch.equal(out[k], ref[k])
    assert isinstance(head.proj[0][1], nn.SiLU) and isinstance(head.proj[0][3], nn.SiLU)
    assert head.hidden_size == 64  # the golden model's width


def test_repa_loss_is_one_minus_cosine_per_token():
    a = torch.randn(2, 5, 7)
    assert repa_loss(a, 3 * a).abs() < 1e-6
    torch.testing.assert_close(repa_loss(a, -a), torch.tensor(2.0))
    b = torch.randn(2, 5, 7)
    want = (1 - (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)).mean()
    torch.testing.assert_close(repa_loss(a, b), want)
    with pytest.raises(ValueError, match="token mismatch"):
        repa_loss(a, b[:, :4])


class Recorder(nn.Module):
    """Returns (B, 1 + L, D) tokens, a leading class token included, and records its input."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        tokens = F.avg_pool2d(x, self.patch).flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)


def test_encoder_input_preparation():
    net = Recorder(patch=14)
    enc = FrozenEncoder(net, patch_size=14)
    img = torch.rand(2, 3, 32, 48)
    out = enc(img, grid=(2, 3))  # a 32x48 image with DiT patch 16
    assert out.shape == (2, 6, 3)  # class token dropped
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = F.interpolate((img - mean) / std, size=(28, 42), mode="bicubic", align_corners=False)
    torch.testing.assert_close(net.seen, want)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.net.training


def test_feature_hook_captures_block_output():
    from deco_export.config import get_preset
    from deco_export.model import DeCo

    model = DeCo(get_preset("DeCo-tiny/16", image_size=(32, 32)))
    hook = FeatureHook(model.dit.blocks[0])
    model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2]))
    h = hook.pop()
    assert h.shape == (2, 4, 64) and h.requires_grad
    with pytest.raises(RuntimeError):
        hook.pop()
    hook.remove()


def test_torchscript_encoder_loads(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 10, 2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).flatten(2).transpose(1, 2)

    path = tmp_path / "enc.pt"
    torch.jit.script(Net()).save(str(path))
    enc = load_encoder(path, patch_size=2)
    assert enc.output_dim() == 10
    assert enc(torch.rand(1, 3, 16, 16), (4, 4)).shape == (1, 16, 10)
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="neither a TorchScript"):
        load_encoder(bad)


# Official dinov2_vitb14 parameter layout (facebookresearch/dinov2, hub backbone, block_chunks=0).
VITB14_TOP = {
    "cls_token": (1, 1, 768),
    "pos_embed": (1, 1370, 768),
    "mask_token": (1, 768),
    "patch_embed.proj.weight": (768, 3, 14, 14),
    "patch_embed.proj.bias": (768,),
    "norm.weight": (768,),
    "norm.bias": (768,),
}
VITB14_BLOCK = {
    "norm1.weight": (768,), "norm1.bias": (768,),
    "attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,),
    "attn.proj.weight": (768, 768), "attn.proj.bias": (768,),
    "ls1.gamma": (768,),
    "norm2.weight": (768,), "norm2.bias": (768,),
    "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
    "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,),
    "ls2.gamma": (768,),
}  # fmt: skip


def test_dinov2_vitb14_has_the_official_layout():
    with torch.device("meta"):
        net = DINOv2.vitb14()
    want = dict(VITB14_TOP)
    for i in range(12):
        want.update({f"blocks.{i}.{k}": v for k, v in VITB14_BLOCK.items()})
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == want
    assert sum(math.prod(s) for s in got.values()) == 86_580_480


def official_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv2's forward_features(x)['x_norm_patchtokens'] transcribed for a plain state dict."""
    p = state["patch_embed.proj.weight"].shape[-1]
    b, _, w, h = x.shape
    t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=p)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(b, -1, -1), t], dim=1)
    pos = state["pos_embed"]
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    w0, h0 = w // p + 0.1, h // p + 0.1
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / m, h0 / m), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
    t = t + torch.cat([pos[:, :1], grid], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    dim = t.shape[-1]
    for i in range(depth):
        s = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(t, (dim,), s["norm1.weight"], s["norm1.bias"], eps=1e-6)
        qkv = F.linear(y, s["attn.qkv.weight"], s["attn.qkv.bias"])
        qkv = qkv.reshape(b, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // heads) ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(b, -1, dim)
        t = t + s["ls1.gamma"] * F.linear(y, s["attn.proj.weight"], s["attn.proj.bias"])
        y = F.layer_norm(t, (dim,), s["norm2.weight"], s["norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s["mlp.fc1.weight"], s["mlp.fc1.bias"])),
                     s["mlp.fc2.weight"], s["mlp.fc2.bias"])  # fmt: skip
        t = t + s["ls2.gamma"] * y
    t = F.layer_norm(t, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return t[:, 1:]


def test_small_dinov2_matches_the_official_forward(tmp_path):
    torch.manual_seed(0)
    net = DINOv2(embed_dim=128, depth=2, num_heads=2, patch_size=14, img_size=98)
    for prm in net.parameters():
        nn.init.normal_(prm, std=0.1)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path = tmp_path / "dinov2_small.pth"
    torch.save(state, path)
    enc = load_encoder(path)  # size inferred from the state dict (64-wide heads)
    assert enc.patch_size == 14 and enc.output_dim() == 128
    x = torch.rand(2, 3, 42, 56)
    want = official_forward(state, enc.prepare(x, (3, 4)), heads=2)
    got = enc(x, (3, 4))
    assert got.shape == (2, 12, 128)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dinov2_with_registers_drops_them():
    net = DINOv2(embed_dim=64, depth=1, num_heads=1, img_size=56, num_register_tokens=4)
    assert "register_tokens" in net.state_dict()
    assert net(torch.rand(1, 3, 28, 28)).shape == (1, 4, 64)
