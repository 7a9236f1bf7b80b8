"""REPA: align an intermediate DiT representation with a frozen vision encoder's patch tokens.

The reference projects the output of DiT block ``align_layer`` (8 for class-to-image) with a
3-layer MLP and maximises its per-token cosine similarity with DINOv2 ViT-B/14 patch tokens of
the clean image. Nothing here downloads weights: the encoder is whatever the user supplies, a
TorchScript file or a state dict of a known architecture (``DINOv2`` below takes the official
``dinov2_vit*14`` checkpoints unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DINOv2",
    "FeatureHook",
    "FrozenEncoder",
    "ProjectionHead",
    "load_encoder",
    "repa_loss",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_PREFIX = "diffusion_trainer.proj.0."


# ------------------------------------------------------------------------------------------------
# Projection head and loss
# ------------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """Linear(D→D) · SiLU · Linear(D→D) · SiLU · Linear(D→enc_dim), all with bias.

    Held as ``proj[0]`` so that its state keys are ``proj.0.{0,2,4}.*``, the reference's
    ``diffusion_trainer.proj.0.{0,2,4}.*`` without the trainer prefix (the reference keeps one
    head per aligned layer in a ModuleList and only ever uses one).
    """

    def __init__(self, hidden_size: int, encoder_dim: int) -> None:
        super().__init__()
        self.hidden_size, self.encoder_dim = hidden_size, encoder_dim
        self.proj = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(hidden_size, hidden_size),
                    nn.SiLU(),
                    nn.Linear(hidden_size, hidden_size),
                    nn.SiLU(),
                    nn.Linear(hidden_size, encoder_dim),
                )
            ]
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj[0](h)

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """State with the reference checkpoint's keys (``diffusion_trainer.proj.0.*``)."""
        return {REFERENCE_PREFIX + k[len("proj.0.") :]: v for k, v in self.state_dict().items()}

    @classmethod
    def from_reference_state_dict(cls, state: Mapping[str, torch.Tensor]) -> ProjectionHead:
        """Build a head from a reference checkpoint's ``state_dict`` (other keys are ignored)."""
        n = len(REFERENCE_PREFIX)
        sub = {k[n:]: v for k, v in state.items() if k.startswith(REFERENCE_PREFIX)}
        if not sub:
            raise KeyError(f"no '{REFERENCE_PREFIX}*' keys in the state dict")
        w0, w4 = sub["0.weight"], sub["4.weight"]
        head = cls(w0.shape[1], w4.shape[0])
        head.proj[0].load_state_dict(sub)
        return head


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over batch and tokens of 1 − cos(projected, target), both (B, L, D)."""
    if projected.shape != target.shape:
        raise ValueError(
            f"REPA token mismatch: projected {tuple(projected.shape)} vs encoder "
            f"{tuple(target.shape)}"
        )
    return (1.0 - F.cosine_similarity(projected.float(), target.float(), dim=-1)).mean()


class FeatureHook:
    """Capture the output of one module (e.g. ``model.dit.blocks[k - 1]``) on every forward.

    A forward hook keeps the model untouched, like the reference; the captured tensor stays in
    the autograd graph so the REPA loss trains the first k blocks.
    """

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: object, output: object) -> None:
        self.value = output[0] if isinstance(output, (tuple, list)) else output

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the hooked module did not run in this forward pass")
        v, self.value = self.value, None
        return v

    def remove(self) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------------------------
# Frozen encoder
# ------------------------------------------------------------------------------------------------


class FrozenEncoder(nn.Module):
    """A frozen feature network plus the reference's input preparation.

    ``forward(images01, grid)`` takes clean images in [0, 1] (B, 3, H, W) and the DiT token grid
    (H/p, W/p); it normalises with the ImageNet mean/std, resizes bicubically (no antialias) to
    (pe·H/p, pe·W/p) for the encoder's patch size pe so that both token grids agree, and
    returns (B, L, D) patch tokens.

    The wrapped network may return a tensor (B, L', D) or a DINOv2-style dict with
    ``x_norm_patchtokens``; when L' exceeds the grid size the leading tokens (class and register
    tokens) are dropped.
    """

    def __init__(self, net: nn.Module, patch_size: int = 14) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.patch_size = patch_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._dim: int | None = getattr(net, "embed_dim", None)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode: the encoder is a fixed target, never trained or re-normalised."""
        return super().train(False)

    def prepare(self, images01: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = (images01.float() - self.mean) / self.std
        size = (self.patch_size * grid[0], self.patch_size * grid[1])
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)

    @torch.no_grad()
    def forward(self, images01: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        out = self.net(self.prepare(images01, grid))
        if isinstance(out, Mapping):
            out = out["x_norm_patchtokens"]
        if isinstance(out, (tuple, list)):
            out = out[0]
        n = grid[0] * grid[1]
        if out.dim() != 3 or out.shape[1] < n:
            raise ValueError(
                f"encoder returned {tuple(out.shape)}; expected (B, {n}, D) patch tokens for a "
                f"{grid[0]}x{grid[1]} grid"
            )
        return out[:, out.shape[1] - n :].float()

    def output_dim(self, device: torch.device | str = "cpu") -> int:
        """Feature width, found by a dry run when the network does not say."""
        if self._dim is None:
            probe = torch.zeros(1, 3, 32, 32, device=device)
            self._dim = int(self(probe, (2, 2)).shape[-1])
        return self._dim


# ------------------------------------------------------------------------------------------------
# DINOv2 ViT (official state-dict layout)
# ------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """DINOv2 ViT with an MLP FFN (ViT-S/B/L/14, with or without registers), inference only.

    Parameter names and shapes are those of the official ``dinov2_vit{s,b,l}14[_reg]_pretrain``
    files, so ``load_state_dict`` takes them as they are. ``forward`` returns
    ``x_norm_patchtokens`` (B, L, D): the final-LayerNorm patch tokens REPA aligns to. The
    positional table (trained at 518 px, 37×37) is resized bicubically as DINOv2 does it: with
    the +0.1 scale-factor offset and no antialias for the original releases, by size with
    antialias for the register releases. This matters for matching their features at 224 px.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 14,
        img_size: int = 518,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.num_register_tokens = num_register_tokens
        n = (img_size // patch_size) ** 2
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @classmethod
    def vitb14(cls) -> DINOv2:
        """The REPA target of the reference (``dinov2_vitb14``)."""
        return cls(embed_dim=768, depth=12, num_heads=12)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> DINOv2:
        """Infer the size from an official state dict (64-wide heads) and load it strictly."""
        if "pos_embed" not in state or "blocks.0.mlp.fc1.weight" not in state:
            raise KeyError("not a DINOv2 ViT state dict with an MLP FFN (no blocks.0.mlp.fc1)")
        dim = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        net = cls(dim, depth, dim // 64, patch, grid * patch, hidden / dim, regs)
        net.load_state_dict(state, strict=True)
        return net

    def _pos_embed(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        if n == h * w and h == w:
            return self.pos_embed.to(dtype)
        m = math.isqrt(n)
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.num_register_tokens:  # the *_reg releases resize by size, with antialias
            patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True)
        else:
            patch = F.interpolate(
                patch, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False
            )
        patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch], dim=1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self._pos_embed(h, w, x.dtype)
        if self.num_register_tokens:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1 + self.num_register_tokens :]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    inner = state.get("state_dict") if isinstance(state, Mapping) else None
    if isinstance(inner, Mapping):
        state = inner
    return dict(state)


def load_encoder(spec: str | Path, patch_size: int | None = None) -> FrozenEncoder:
    """Load a frozen REPA target from a local file.

    ``spec`` is a TorchScript file (``torch.jit.save``; give ``patch_size``, default 14) or a
    state dict (``.pth``/``.pt``/``.safetensors``) of a DINOv2 ViT/14 in the official layout.
    Raises ``FileNotFoundError`` / ``ValueError`` with a one-line reason otherwise.
    """
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"REPA encoder file not found: {path}")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
        return FrozenEncoder(net, patch_size or 14)
    except RuntimeError:
        pass
    try:
        state = _read_state_dict(path)
        net = DINOv2.from_state_dict(state)
    except Exception as e:  # any failure here means "not a supported file"
        raise ValueError(
            f"{path} is neither a TorchScript module nor a DINOv2 ViT state dict ({e})"
        ) from None
    if patch_size not in (None, net.patch_size):
        raise ValueError(f"{path} has patch size {net.patch_size}, not {patch_size}")
    return FrozenEncoder(net, net.patch_size)
