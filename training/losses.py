"""DeCo training objective: flow matching, the frequency-aware loss and label dropout.

Conventions follow the reference trainer (deco-reference.md §4): t = 0 is noise, t = 1 is data,
x_t = t·x + (1 − t)·ε and the network regresses the velocity v = x − ε. The total loss is

    L = MSE(v̂, v) + λ_freq · L_freq(v̂, v) + λ_repa · L_repa

where L_freq weights the squared 8×8 DCT coefficients of the YCbCr velocity error with inverse
JPEG quantisation tables, so the pixel decoder is pushed hardest on the frequencies a JPEG
encoder would keep. L_repa lives in ``training.repa``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "JPEG_CHROMA",
    "JPEG_LUMA",
    "FrequencyLoss",
    "dct_matrix",
    "drop_labels",
    "frequency_weights",
    "interpolate",
    "jpeg_quant_tables",
    "rgb_to_ycbcr",
    "sample_t",
]

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), row = vertical frequency.
JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)

# Full-range BT.601 (JFIF) matrix without the +128 offsets: only differences are ever transformed.
_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)


# ------------------------------------------------------------------------------------------------
# Flow matching
# ------------------------------------------------------------------------------------------------


def sample_t(
    n: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logit-normal times t = sigmoid(N(0, 1)), then t ↦ t / (t + (1 − t)·shift).

    The logit-normal density concentrates training on intermediate noise levels, where the
    velocity is hardest to predict; shift > 1 moves mass toward noise (t = 0), which large
    images need because they stay recognisable at higher noise.
    """
    t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    if shift != 1.0:
        t = t / (t + (1.0 - t) * shift)
    return t


def interpolate(
    x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_t, v): x_t = t·x + (1 − t)·ε and the regression target v = x − ε."""
    tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return tt * x + (1.0 - tt) * noise, x - noise


def drop_labels(
    y: torch.Tensor,
    p: float,
    null_class: int,
    *,
    coins: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance).

    ``coins`` are uniform numbers in [0, 1), one per label (drawn here when not given). They
    are drawn even when p == 0 so that the random stream, and hence resumed or re-sharded runs,
    do not depend on whether dropout is active.
    """
    if coins is None:
        coins = torch.rand(y.shape, generator=generator, device=y.device)
    return torch.where(coins < p, torch.full_like(y, null_class), y)


# ------------------------------------------------------------------------------------------------
# Frequency-aware loss
# ------------------------------------------------------------------------------------------------


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB → YCbCr with the JFIF matrix and no offsets."""
    m = torch.tensor(_YCBCR, dtype=x.dtype, device=x.device)
    return torch.einsum("oc,bchw->bohw", m, x)


def dct_matrix(n: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix C[k, i] = a_k cos(π(2i + 1)k / 2n); a block X maps to C X Cᵀ."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
    a = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64)
    a[0, 0] = math.sqrt(1.0 / n)
    return (a * c).to(dtype)


def jpeg_quant_tables(quality: int = 85) -> torch.Tensor:
    """Annex K luminance and chrominance tables scaled with the IJG quality rule: (3, 8, 8).

    Order is (Y, Cb, Cr); both chroma channels use the chrominance table.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor([JPEG_LUMA, JPEG_CHROMA, JPEG_CHROMA], dtype=torch.int64)
    return torch.clamp((base * scale + 50) // 100, 1, 255).to(torch.float64)


def frequency_weights(
    quality: int = 85, mode: str = "inv_gamma", gamma: float = 1.0
) -> torch.Tensor:
    """Per-channel DCT weights (3, 8, 8), float32, each table normalised to mean 1.

    ``inv_gamma``: w = (mean(Q) / Q)^γ, so coarsely quantised (perceptually unimportant)
    frequencies count less. ``uniform`` gives all ones (the loss then equals a plain MSE in the
    orthonormal DCT domain of YCbCr).
    """
    q = jpeg_quant_tables(quality)
    if mode == "inv_gamma":
        w = (q.mean(dim=(1, 2), keepdim=True) / q) ** gamma
    elif mode == "uniform":
        w = torch.ones_like(q)
    else:
        raise ValueError(f"unknown frequency weighting mode {mode!r} (inv_gamma, uniform)")
    w = w / w.mean(dim=(1, 2), keepdim=True)
    return w.to(torch.float32)


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H/n, W/n, n, n), reflect-padding bottom/right to a multiple of n."""
    b, c, h, w = x.shape
    ph, pw = (-h) % n, (-w) % n
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        h, w = h + ph, w + pw
    return x.reshape(b, c, h // n, n, w // n, n).permute(0, 1, 2, 4, 3, 5)


class FrequencyLoss(torch.nn.Module):
    """Frequency-aware velocity loss of DeCo: mean of w_c[u, v]·(DCT(v̂) − DCT(v))².

    The mean runs over batch, the three YCbCr channels, all 8×8 blocks and all 64
    coefficients. Computed in float32 regardless of autocast: the weighted squared errors span
    two orders of magnitude and are tiny, exactly where bf16 loses the signal.
    """

    def __init__(self, quality: int = 85, mode: str = "inv_gamma", gamma: float = 1.0) -> None:
        super().__init__()
        self.quality, self.mode, self.gamma = quality, mode, gamma
        self.register_buffer("weights", frequency_weights(quality, mode, gamma), persistent=False)
        self.register_buffer("dct", dct_matrix(8), persistent=False)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, H, W) → DCT coefficients (B, 3, H/8, W/8, 8, 8)."""
        blocks = _blocks(rgb_to_ycbcr(x.float()), 8)
        return self.dct @ blocks @ self.dct.T

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            diff = self.transform(pred) - self.transform(target)
            w = self.weights[None, :, None, None]
            return (w * diff.square()).mean()
