"""The text-to-image DiT (the reference's ``dit_t2i_DeCo.PixNerDiT``), in the order data flows:

text (B, L, C) -> y_embedder + y_pos_embedding -> text-refine blocks -> main blocks (image
queries; keys and values from the image and the refined text) -> cond = SiLU(e_t + h).

The patch embedder, timestep embedder, RoPE rotation and the whole pixel decoder are the c2i
ones from :mod:`deco_export.model`. What differs from c2i, each visible in the numbers:

* c = SiLU(e_t): there is no pooled text vector, so the blocks' adaLN depends on t only;
* the SwiGLU is fused (``mlp.w12`` = [gate | value]) with hidden 4D and ``mlp.w3`` out;
* RoPE positions count tokens (``precompute_freqs_cis_ex2d``): x = linspace(0, H_tok, W_tok),
  y = linspace(0, W_tok, H_tok). The two spans are crossed, which only shows when H != W;
* RMSNorm multiplies its weight before casting back (the shared ``layers/rmsnorm.py``);
* the decoder's pixel position features are the cosines of a RoPE table (see
  :func:`rope_position_features`), not the DCT basis.

The work splits by what it depends on: :meth:`TextDiT.embed_text` (prompt only: once per
prompt), :meth:`TextDiT.refine_text` (prompt and t: the refine blocks' adaLN comes from
SiLU(e_t)) and the image blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtimes.config import ModelConfig

from .layers import (
    GuidanceEmbedder,
    PatchEmbedder,
    RMSNorm,
    TimestepEmbedder,
    apply_rope,
    block_time_embedding,
    length,
    linspace,
    modulate,
    patchify,
    rope_from_positions,
)

# ---------------------------------------------------------------------------------------------
# Positions: the T2I RoPE of the DiT and the decoder's per-pixel features.
# ---------------------------------------------------------------------------------------------


def t2i_rope_tables(grid_h: int, grid_w: int, head_dim: int, device: torch.device | None,
                    theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (L, head_dim/2) of the T2I RoPE: unnormalised, crossed spans.

    x = linspace(0, grid_h, grid_w) and y = linspace(0, grid_w, grid_h), as the reference's
    ``precompute_freqs_cis_ex2d(dim, height, width)`` computes them (height and width swapped
    in the ends): near-integer positions with step n/(n-1) on a square grid. The ends and
    counts are computed in-graph from the grid sizes, so an exported graph follows its input's
    size (see `layers.linspace`).
    """
    x_pos = linspace(length(grid_h, device), grid_w, device)
    y_pos = linspace(length(grid_w, device), grid_h, device)
    y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
    return rope_from_positions(x_pos, y_pos, head_dim, theta)


def rope_position_features(p: int, width: int = 64, dtype: torch.dtype = torch.float32,
                           device: torch.device | None = None) -> Tensor:
    """(p*p, width) T2I pixel features: the real part of a 2-D RoPE table of dim 2*width.

    Pixel (ky, kx) gets [cos(x f_0), cos(y f_0), cos(x f_1), cos(y f_1), ...] with
    x = kx*p/(p-1), y = ky*p/(p-1) and f_k = 10000^(-k/(width/2)): the reference builds the
    complex table and casts it to the input dtype, which keeps the real part.
    """
    cos, _ = t2i_rope_tables(p, p, 2 * width, device)
    return cos.to(dtype)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class T2IRMSNorm(RMSNorm):
    """RMSNorm in float32 that multiplies the weight *before* casting back (the T2I code's
    norm; equal to the c2i one in float32, a last-bit difference under autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class FusedSwiGLU(nn.Module):
    """w3(SiLU(gate) * value) with [gate | value] = w12(x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class TextSelfAttention(nn.Module):
    """Self-attention over the text tokens: q/k RMSNorm, no RoPE, no mask (pads count)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_norm = T2IRMSNorm(self.head_dim)
        self.k_norm = T2IRMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(dim=2)
        q, k, v = (z.transpose(1, 2) for z in (self.q_norm(q), self.k_norm(k), v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ImageTextAttention(nn.Module):
    """Image queries over keys/values [image; text]. RoPE on the image q/k only; the text keys
    share the image ``k_norm``; no mask. The text stream is read, never updated."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv_x = nn.Linear(dim, dim * 3, bias=False)
        self.kv_y = nn.Linear(dim, dim * 2, bias=False)
        self.q_norm = T2IRMSNorm(self.head_dim)
        self.k_norm = T2IRMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)

    def text_kv(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Text keys (normalised) and values (B, heads, L_text, hd): they depend only on the
        refined text, so a runtime may compute them before the image blocks."""
        b, n, _ = y.shape
        k, v = self.kv_y(y).reshape(b, n, 2, self.num_heads, self.head_dim).unbind(dim=2)
        return self.k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, y: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv_x(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(dim=2)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_norm(k), cos, sin).transpose(1, 2)
        k_y, v_y = self.text_kv(y)
        k = torch.cat([k, k_y], dim=2)
        v = torch.cat([v.transpose(1, 2), v_y], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class T2IBlock(nn.Module):
    """Pre-norm adaLN block (no SiLU inside the modulation) around ``attn`` and a fused SwiGLU.

    The text-refine blocks hold a :class:`TextSelfAttention`, the main blocks an
    :class:`ImageTextAttention`; the extra forward arguments go to the attention.
    """

    def __init__(self, dim: int, mlp_hidden: int, attn: nn.Module):
        super().__init__()
        self.norm1 = T2IRMSNorm(dim)
        self.attn = attn
        self.norm2 = T2IRMSNorm(dim)
        self.mlp = FusedSwiGLU(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: Tensor, c: Tensor, *attn_args: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1)
        )
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), *attn_args)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class TextEmbedder(nn.Module):
    """``y_embedder``: Linear(text_dim -> D, bias) then RMSNorm."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, hidden_size, bias=True)
        self.norm = T2IRMSNorm(hidden_size)

    def forward(self, text: Tensor) -> Tensor:
        return self.norm(self.proj(text))


# ---------------------------------------------------------------------------------------------
# TextDiT: (x_t, t, text) -> per-token condition s = SiLU(e_t + h)
# ---------------------------------------------------------------------------------------------


class TextDiT(nn.Module):
    """The text-to-image DiT. Same contract as the c2i :class:`~deco_export.model.DiT`:
    ``forward`` returns ``(cond, hidden)`` and :meth:`refresh_condition` rebuilds cond."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, p, c = config.hidden_size, config.patch_size, config.in_channels
        heads, mlp = config.num_heads, config.mlp_hidden_size
        self.s_embedder = PatchEmbedder(c * p * p, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = TextEmbedder(config.text_dim, d)
        self.y_pos_embedding = nn.Parameter(torch.randn(1, config.text_len, d))
        if config.guidance_distilled:
            self.g_embedder = GuidanceEmbedder(d)
        self.text_refine_blocks = nn.ModuleList(
            T2IBlock(d, mlp, TextSelfAttention(d, heads)) for _ in range(config.refine_depth)
        )
        self.blocks = nn.ModuleList(
            T2IBlock(d, mlp, ImageTextAttention(d, heads)) for _ in range(config.dit_depth)
        )

    def embed_text(self, text: Tensor) -> Tensor:
        """Prompt-only part: y_embedder(text) + y_pos_embedding, (B, text_len, D)."""
        expected = (self.config.text_len, self.config.text_dim)
        if tuple(text.shape[-2:]) != expected:
            raise ValueError(
                f"text embeddings must be (B, {expected[0]}, {expected[1]}) for this model, got "
                f"{tuple(text.shape)}; encode with the model's text encoder (right-padded to "
                f"{expected[0]} tokens)"
            )
        y = self.y_embedder(text.to(self.y_pos_embedding.dtype))
        return y + self.y_pos_embedding.to(y.dtype)

    def refine_text(self, y: Tensor, c: Tensor) -> Tensor:
        """The refine blocks over embedded text; c = SiLU(e_t), so this runs every step."""
        for block in self.text_refine_blocks:
            y = block(y, c)
        return y

    def forward_embedded(self, x_t: Tensor, t: Tensor, y: Tensor,
                         guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """forward() from :meth:`embed_text`'s output (prompt work done once, outside)."""

        b, c, h, w = x_t.shape
        p = self.config.patch_size
        cos, sin = t2i_rope_tables(h // p, w // p, self.config.head_dim, x_t.device)
        patches = patchify(x_t, p).permute(0, 2, 1, 3).reshape(b, -1, c * p * p)
        x = self.s_embedder(patches)
        e_t = self.t_embedder(t).unsqueeze(1)
        c_vec = F.silu(block_time_embedding(self, e_t, guidance))
        y = self.refine_text(y, c_vec)
        for block in self.blocks:
            x = block(x, c_vec, y, cos, sin)
        return F.silu(e_t + x), x

    def forward(self, x_t: Tensor, t: Tensor, text: Tensor,
                guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward_embedded(x_t, t, self.embed_text(text), guidance)

    def refresh_condition(self, hidden: Tensor, t: Tensor) -> Tensor:
        """cond for a new timestep from a cached last-block output: SiLU(e_t + h)."""
        return F.silu(self.t_embedder(t).unsqueeze(1) + hidden)
