"""Building blocks both model families share (`deco_export.model` for class labels,
`deco_export.model_t2i` for text): patches with ranks <= 5 for Core ML, the patch and timestep
embedders, RMSNorm, the 2-D RoPE rotation and adaLN's modulate. Each family's own layers stay
in its file, in the order data flows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Patches: (B, C, H, W) <-> per-token pixels, with ranks <= 5 for Core ML.
# ---------------------------------------------------------------------------------------------


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, C, L, p*p): tokens in raster order, pixels ky*p + kx inside a patch."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    x = x.reshape(b * c, gh, p, gw, p).permute(0, 1, 3, 2, 4)  # (BC, gh, gw, ky, kx)
    return x.reshape(b, c, gh * gw, p * p)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, C, L, p*p) -> (B, C, H, W)."""
    b, c = x.shape[0], x.shape[1]
    gh, gw = h // p, w // p
    x = x.reshape(b * c, gh, gw, p, p).permute(0, 1, 3, 2, 4)  # (BC, gh, ky, gw, kx)
    return x.reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


class PatchEmbedder(nn.Module):
    """Linear(C*p*p -> D) on channel-major patch vectors (index c*p*p + ky*p + kx)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(in_features, hidden_size, bias=True)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by an MLP.

    The reference uses max_period 10 (not 10000) because t is not scaled by 1000, and orders the
    features [cos | sin]. Both matter for the released weights.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def frequency_features(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * k / half)
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        features = self.frequency_features(t)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class GuidanceEmbedder(TimestepEmbedder):
    """Sinusoidal features of the guidance scale w followed by an MLP, for a guidance-distilled
    model: its output is added to the time embedding that conditions the DiT blocks.

    w spans about 1..10 rather than t's 0..1, so the periods reach 100 (the features stay
    distinct over that range). The MLP's last layer starts at zero, so a student built from a
    teacher's weights gives exactly the teacher's conditional velocity until it is trained.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 100.0):
        super().__init__(hidden_size, frequency_size, max_period)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)


def block_time_embedding(dit: Any, e_t: Tensor, guidance: Tensor | None) -> Tensor:
    """The time embedding the DiT blocks read: e_t, plus the guidance embedding of w for a
    guidance-distilled model (w = 1, the conditional velocity, when ``guidance`` is None).

    A model without the guidance embedding refuses a ``guidance`` rather than ignoring it."""
    if not dit.config.guidance_distilled:
        if guidance is not None:
            raise ValueError("this model is not guidance-distilled: it takes no guidance input; "
                             "guide it with classifier-free guidance instead")
        return e_t
    if guidance is None:
        guidance = torch.ones(e_t.shape[0], device=e_t.device)
    return e_t + dit.g_embedder(guidance).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# DiT block parts: RMSNorm, the 2-D RoPE, adaLN modulate
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; the weight multiplies after casting back, as the c2i code."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def linspace(end: Tensor | float, steps: int, device: torch.device | None = None) -> Tensor:
    """float32 ``torch.linspace(0, end, steps)`` built from ``arange``, with the kernel's formula.

    ``torch.linspace`` with a length taken from an input's shape is traced to a constant of the
    traced size, so an exported graph would serve one resolution only; ``arange`` of that length
    exports as a shape-dependent range. The values follow PyTorch's kernel: step = end /
    (steps - 1) in float32, i * step for the first half and end - (steps - 1 - i) * step for the
    second. PyTorch rounds the latter once (fused multiply-add); here it rounds twice, so a
    position may differ from ``torch.linspace`` in its last bit (1e-6 at 16), far below every
    parity tolerance. ``end`` may be a (1,) tensor (the T2I RoPE's span is the other axis's
    token count). ``steps`` = 1 gives [0], as PyTorch.
    """
    idx = torch.arange(steps, dtype=torch.float32, device=device)
    last = idx[-1:]  # steps - 1, as float32
    if not isinstance(end, Tensor):
        end = torch.full((1,), float(end), dtype=torch.float32, device=device)
    step = end / torch.clamp(last, min=1.0)
    half = torch.clamp(torch.floor((last + 1.0) / 2.0), min=1.0)  # steps // 2, at least 1
    return torch.where(idx < half, idx * step, end - (last - idx) * step)


def length(steps: int, device: torch.device | None = None) -> Tensor:
    """``steps`` as a (1,) float32 tensor computed in-graph (an axis length of the input)."""
    return torch.arange(steps, dtype=torch.float32, device=device)[-1:] + 1.0


def rope_from_positions(x_pos: Tensor, y_pos: Tensor, head_dim: int,
                        theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (L, head_dim/2) of the 2-D RoPE for per-token positions (L,) in float32.

    Pair j rotates by x*f_{j/2} for even j and y*f_{(j-1)/2} for odd j, f_k = theta^(-4k/hd).
    """
    k = torch.arange(0, head_dim, 4, dtype=torch.float32, device=x_pos.device)[: head_dim // 4]
    freqs = 1.0 / (theta ** (k / head_dim))
    x_angles = x_pos.reshape(-1, 1) * freqs[None, :]
    y_angles = y_pos.reshape(-1, 1) * freqs[None, :]
    angles = torch.stack([x_angles, y_angles], dim=-1).reshape(-1, head_dim // 2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (x[2j], x[2j+1]) of x (B, N, heads, hd) in float32."""
    b, n, heads, hd = x.shape
    pairs = x.float().reshape(b, n, heads, hd // 2, 2)
    a, c = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.stack([a * cos - c * sin, a * sin + c * cos], dim=-1)
    return rotated.reshape(b, n, heads, hd).type_as(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift
