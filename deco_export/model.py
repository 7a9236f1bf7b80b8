"""DeCo: a DiT for the low frequencies and a per-pixel decoder for the high frequencies.

One file, in the order data flows (as facebookresearch/DiT's ``models.py``):
embedders -> DiT blocks -> DiT -> pixel decoder blocks -> PixelDecoder -> DeCo; the pieces
the text-to-image family shares (patchify, the patch and timestep embedders, RMSNorm, RoPE,
modulate) live in ``layers.py``.

The numerics follow the reference class-conditional DeCo (``dit_c2i_DeCo.PixNerDiT``) exactly;
see docs/architecture.md. Two deliberate departures in *form*, not in value:

* RoPE is written with real cos/sin instead of complex numbers, so the graphs export to ONNX
  and Core ML.
* ``unfold``/``fold`` with kernel == stride are written as reshapes/permutes of rank <= 5,
  so batch stays dynamic in every exporter.

Submodule names keep the reference's names (``s_embedder``, ``dec_net``-style blocks, ...)
so a reference state dict maps onto ours by prefix alone.
"""

from __future__ import annotations

from pathlib import Path

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
    linspace,
    modulate,
    patchify,
    rope_from_positions,
    unpatchify,
)

# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


# ---------------------------------------------------------------------------------------------
# DiT block: RMSNorm, q/k-normalised attention with 2-D RoPE, SwiGLU, adaLN.
# ---------------------------------------------------------------------------------------------


def rope_tables(grid_h: int, grid_w: int, head_dim: int, device: torch.device,
                span: float = 16.0, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (L, head_dim/2) for the c2i 2-D RoPE.

    Positions are normalised to [0, span] whatever the grid size, so 256 and 512 share one
    position range. The grid sizes may come from the input's shape: an exported graph computes
    the tables for the size it runs at (see `layers.linspace`).
    """
    x_pos = linspace(span, grid_w, device)
    y_pos = linspace(span, grid_h, device)
    y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
    return rope_from_positions(x_pos, y_pos, head_dim, theta)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, heads, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTBlock(nn.Module):
    """Pre-norm block with 6-way adaLN. No SiLU inside the modulation: c is SiLU'd once."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1)
        )
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


# ---------------------------------------------------------------------------------------------
# DiT: (x_t, t, y) -> per-token condition s = SiLU(e_t + h)
# ---------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """The expensive, low-frequency half. Returns ``(cond, hidden)``.

    ``hidden`` is the last block's output h; ``cond = SiLU(e_t + h)`` is what the decoder needs.
    Both are returned so a sampler can reuse h across steps and rebuild ``cond`` for a new t
    (:meth:`refresh_condition`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, p, c = config.hidden_size, config.patch_size, config.in_channels
        self.s_embedder = PatchEmbedder(c * p * p, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d)
        if config.guidance_distilled:
            self.g_embedder = GuidanceEmbedder(d)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_hidden_size) for _ in range(config.dit_depth)
        )

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, e_t, _ = self.trunk(x_t, t, y, guidance)
        return F.silu(e_t + x), x

    def trunk(self, x_t: Tensor, t: Tensor, y: Tensor,
              guidance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The blocks' output h (B, L, D) with e_t (B, 1, D) and the block condition
        c = SiLU(e_t + e_w + e_y) (B, 1, D): what DeCo's head and the plain DiT's final layer
        need. e_w, the guidance embedding of a guidance-distilled model, conditions the blocks
        only: the output's SiLU(e_t + h) stays a function of (h, t), so the refresh graph
        serves both kinds of model."""
        b, c, h, w = x_t.shape
        p = self.config.patch_size
        cos, sin = rope_tables(h // p, w // p, self.config.head_dim, x_t.device)
        patches = patchify(x_t, p).permute(0, 2, 1, 3).reshape(b, -1, c * p * p)
        x = self.s_embedder(patches)
        e_t = self.t_embedder(t).unsqueeze(1)
        c_vec = F.silu(block_time_embedding(self, e_t, guidance) + self.y_embedder(y).unsqueeze(1))
        for block in self.blocks:
            x = block(x, c_vec, cos, sin)
        return x, e_t, c_vec

    def refresh_condition(self, hidden: Tensor, t: Tensor) -> Tensor:
        """cond for a new timestep from a cached last-block output: SiLU(e_t + h)."""
        return F.silu(self.t_embedder(t).unsqueeze(1) + hidden)


# ---------------------------------------------------------------------------------------------
# Pixel decoder: (x_t, cond) -> velocity, per pixel, width 32, no attention.
# ---------------------------------------------------------------------------------------------


def dct_position_features(p: int, max_freqs: int = 8, dtype: torch.dtype = torch.float32,
                          device: torch.device | None = None) -> Tensor:
    """(p*p, max_freqs**2) DCT-basis features of the pixel position inside a patch.

    Frequencies are linspace(0, 8, 8) (not the integers), positions k/(p-1), damping
    1/(1 + g_a g_b); feature 8a + b pairs x-frequency a with y-frequency b.
    """
    pos = torch.linspace(0, 1, p, dtype=dtype, device=device)
    pos_y, pos_x = torch.meshgrid(pos, pos, indexing="ij")
    pos_x = pos_x.reshape(-1, 1, 1)
    pos_y = pos_y.reshape(-1, 1, 1)
    freqs = torch.linspace(0, max_freqs, max_freqs, dtype=dtype, device=device)
    freqs_x = freqs[None, :, None]
    freqs_y = freqs[None, None, :]
    coeffs = (1 + freqs_x * freqs_y) ** -1
    dct_x = torch.cos(pos_x * freqs_x * torch.pi)
    dct_y = torch.cos(pos_y * freqs_y * torch.pi)
    return (dct_x * dct_y * coeffs).reshape(p * p, max_freqs * max_freqs)


class PixelEmbedder(nn.Module):
    """Per-pixel Linear(C + 64 -> d) on [noisy RGB | position features] (NerfEmbedder).

    ``features`` is the (p*p, 64) table of the pixel position inside a patch: the DCT basis for
    c2i, the cosines of a RoPE table for t2i (same width, different values). It is a fixed
    function of the patch size, so it is a non-persistent buffer named ``dct`` in both.
    """

    def __init__(self, in_channels: int, hidden_size: int, features: Tensor):
        super().__init__()
        self.embedder = nn.Sequential(nn.Linear(in_channels + features.shape[-1], hidden_size))
        self.register_buffer("dct", features, persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, L, p*p, C) -> (B, L, p*p, d)."""
        linear = self.embedder[0]
        c = pixels.shape[-1]
        # Equal to Linear(cat[pixels, dct]) but without materialising the repeated table.
        dct = self.dct.to(linear.weight.dtype)
        position_term = F.linear(dct, linear.weight[:, c:], linear.bias)
        return F.linear(pixels, linear.weight[:, :c]) + position_term


class DecoderBlock(nn.Module):
    """LayerNorm (affine) -> modulate -> Linear-SiLU-Linear -> gated residual (ResBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, silu_cond: Tensor) -> Tensor:
        # silu_cond is SiLU(cond), computed once for all blocks (adaLN_modulation[0] is that SiLU).
        shift, scale, gate = self.adaLN_modulation[1](silu_cond).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class DecoderFinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm_final(x))


class PixelDecoder(nn.Module):
    """The cheap, full-resolution half: every pixel is decoded from its noisy value, its
    position in the patch, and its slice of a learned per-token projection of the DiT output.

    ``forward(x_t, cond)`` is ``pixels(x_t, modulation(cond))``. The condition part
    (``cond_embed``, D -> p*p*d per token, and its SiLU: the per-pixel condition every block's
    adaLN reads) depends on the DiT's output alone, so a sampler that reuses a condition under
    DiT sharing computes it once and runs only the pixel part on the reused steps. The blocks'
    adaLN projections (d -> 3d per pixel) stay in the pixel part: their output is nine times
    wider than their input, and reading a cached (B, L, p*p, 9d) float32 tensor (75 MB per
    image at 256x256) cost more than recomputing it on the CPUs measured (docs/benchmarks.md).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, p = config.decoder_hidden_size, config.patch_size
        if config.is_text_to_image:
            from .model_t2i import rope_position_features

            features = rope_position_features(p)
        else:
            features = dct_position_features(p)
        self.x_embedder = PixelEmbedder(config.in_channels, d, features)
        self.cond_embed = nn.Linear(config.hidden_size, p * p * d)
        self.input_proj = nn.Linear(d, d)
        self.res_blocks = nn.ModuleList(DecoderBlock(d) for _ in range(config.decoder_depth))
        self.final_layer = DecoderFinalLayer(d, config.in_channels)

    def forward(self, x_t: Tensor, cond: Tensor) -> Tensor:
        return self.pixels(x_t, self.modulation(cond))

    def modulation(self, cond: Tensor) -> Tensor:
        """The condition part: (B, L, D) -> SiLU(cond_embed(cond)) as (B, L, p*p, d), the
        per-pixel condition of every block's adaLN."""
        # Split the last axis only: no batch size in the graph's shape arithmetic.
        p, d = self.config.patch_size, self.config.decoder_hidden_size
        return F.silu(self.cond_embed(cond).unflatten(-1, (p * p, d)))

    def pixels(self, x_t: Tensor, modulation: Tensor) -> Tensor:
        """The pixel part: the velocity from x_t and a `modulation` computed earlier."""
        z = self._embed(x_t)
        for block in self.res_blocks:
            z = block(z, modulation)
        return self._head(z, x_t.shape)

    def _embed(self, x_t: Tensor) -> Tensor:
        pixels = patchify(x_t, self.config.patch_size).permute(0, 2, 3, 1)  # (B, L, p*p, C)
        return self.input_proj(self.x_embedder(pixels.to(self.input_proj.weight.dtype)))

    def _head(self, z: Tensor, shape: torch.Size) -> Tensor:
        v = self.final_layer(z)  # (B, L, p*p, C)
        return unpatchify(v.permute(0, 3, 1, 2), self.config.patch_size, shape[2], shape[3])


# ---------------------------------------------------------------------------------------------
# DeCo = DiT + PixelDecoder
# ---------------------------------------------------------------------------------------------


def make_dit(config: ModelConfig) -> nn.Module:
    """The DiT of the config's family: labels (c2i) or text embeddings (t2i) in."""
    if config.is_text_to_image:
        from .model_t2i import TextDiT

        return TextDiT(config)
    return DiT(config)


class DeCo(nn.Module):
    """Velocity model v(x_t, t, y) with t = 0 noise and t = 1 data (v = x - noise).

    ``y`` is the class labels (B,) int64 for c2i and the text encoder's hidden states
    (B, text_len, text_dim) float32 for t2i; everything after the DiT is shared.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.has_decoder:
            raise ValueError(
                f"a {config.architecture!r} config builds a PixelDiT, not DeCo; use build_model"
            )
        self.config = config
        self.dit = make_dit(config)
        self.decoder = PixelDecoder(config)
        self.initialize_weights()

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """``guidance`` (B,) float32: the scale w of a guidance-distilled model, whose output
        is then the guided velocity (None: w = 1)."""
        cond, _ = self.dit(x_t, t, y, guidance)
        return self.decoder(x_t, cond)

    def initialize_weights(self) -> None:
        """The reference initialisation (DiT adaLN is *not* zeroed; the decoder's is)."""
        nn.init.xavier_uniform_(self.dit.s_embedder.proj.weight)
        nn.init.zeros_(self.dit.s_embedder.proj.bias)
        if not self.config.is_text_to_image:
            nn.init.normal_(self.dit.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.dit.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.dit.t_embedder.mlp[2].weight, std=0.02)
        dec = self.decoder
        for module in [dec.cond_embed, dec.input_proj, *[b.mlp[i] for b in dec.res_blocks
                                                         for i in (0, 2)]]:
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        for module in [*[b.adaLN_modulation[1] for b in dec.res_blocks], dec.final_layer.linear]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DeCo:
        from .pretrained import load_pretrained_as

        return load_pretrained_as(build_model, path, device=device)  # type: ignore[return-value]

    def save_pretrained(self, path: str | Path, **metadata) -> Path:
        from .pretrained import save_pretrained

        return save_pretrained(self, path, **metadata)


# ---------------------------------------------------------------------------------------------
# PixelDiT: the plain pixel DiT that DeCo is measured against (reference FlattenDiT)
# ---------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> adaLN shift/scale from c -> Linear(D -> p*p*C), per token.

    Like the blocks' modulation it has no SiLU inside: c is already SiLU(e_t + e_y).
    """

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.linear = nn.Linear(hidden_size, out_features, bias=True)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixelDiT(nn.Module):
    """v(x_t, t, y) from DiT tokens alone: the same embedders, RoPE and blocks as DeCo's DiT,
    then :class:`FinalLayer` and unpatchify. One network, no pixel decoder, so every pixel of a
    patch comes from one linear map of its token; that is the bottleneck DeCo's decoder removes.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.has_decoder:
            raise ValueError(
                f"a {config.architecture!r} config builds DeCo, not a PixelDiT; use build_model"
            )
        self.config = config
        p, c = config.patch_size, config.in_channels
        self.dit = DiT(config)
        self.final_layer = FinalLayer(config.hidden_size, c * p * p)
        self.initialize_weights()

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        b, c, h, w = x_t.shape
        p = self.config.patch_size
        x, _, c_vec = self.dit.trunk(x_t, t, y)
        out = self.final_layer(x, c_vec)  # (B, L, C*p*p), channel-major as the patch embedder
        return unpatchify(out.reshape(b, -1, c, p * p).permute(0, 2, 1, 3), p, h, w)

    def initialize_weights(self) -> None:
        """The DiT part as DeCo's; the final layer zero-initialised (v = 0 at step 0), as DiT."""
        nn.init.xavier_uniform_(self.dit.s_embedder.proj.weight)
        nn.init.zeros_(self.dit.s_embedder.proj.bias)
        nn.init.normal_(self.dit.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.dit.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.dit.t_embedder.mlp[2].weight, std=0.02)
        for module in (self.final_layer.adaLN_modulation[0], self.final_layer.linear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | Path, **metadata) -> Path:
        from .pretrained import save_pretrained

        return save_pretrained(self, path, **metadata)


def build_model(config: ModelConfig) -> DeCo | PixelDiT:
    """The network a config describes: DeCo for "deco", PixelDiT for "dit"."""
    return DeCo(config) if config.has_decoder else PixelDiT(config)


def random_model(config: ModelConfig, seed: int | None = None, std: float = 0.02) -> DeCo:
    """A DeCo of ``config`` with random weights that produce images: the reference init zeroes
    the output layers (so the velocity, and every image, would be zero), and those tensors get
    N(0, std) noise instead. For benchmarks and size studies, where the weights' values are not
    the point; ``seed`` seeds torch's generator first."""
    if seed is not None:
        torch.manual_seed(seed)
    model = DeCo(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(std=std)
    return model
