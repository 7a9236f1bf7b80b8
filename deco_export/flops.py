"""Analytic FLOP counts of the graphs, from the model config alone (no torch, no tracing).

Counted as a profiler counts them (``torch.utils.flop_counter.FlopCounterMode``): two FLOPs
per multiply-add of every matrix product (linear layers, attention's QK^T and AV), nothing
for elementwise work, norms or softmax. That is the work a GEMM peak bounds, so
``achieved GFLOP/s / measured peak`` is a roofline fraction: how close a backend runs to what
the machine's matrix units can do.

The decoder is counted in two parts, as the split decoder's graphs run it under DiT sharing:

* ``decoder_cond``: ``cond_embed`` (D -> p*p*d per token, i.e. per pixel), what the sampler
  caches for the steps that reuse the DiT's condition;
* ``decoder_pixel``: the rest: the pixel embedding, ``input_proj``, the blocks' per-pixel adaLN
  modulations (d -> 3d each) and MLPs, and the final layer.

The text-to-image DiT (``family="t2i"``) adds the text path: the refine blocks over the text
tokens, each block's text keys/values (``kv_y``) and the image queries' attention to the text
keys, every step; ``y_embedder`` is its own graph, ``text_embed``, once per generation.

A guidance-distilled model's DiT (``guidance_distilled``) adds the guidance embedding's MLP,
the time embedding's twin; its sampler runs one conditional pass per step, which the sampling
cost (`SamplingPlan.cost` with ``distilled``) counts.

The plain pixel DiT baseline (``architecture="dit"``) is one graph, ``pixel_dit``: the DiT
blocks and a final layer (adaLN shift/scale, D -> p*p*C per token).

A config is a `ModelConfig`, a `runtimes.ModelConfig` or any mapping with its field names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtimes.graphs import GRAPH_SPECS
from runtimes.sampler import SamplingCost

__all__ = ["GRAPHS", "TRAINING_FACTOR", "graph_flops", "sampling_flops", "text_embedding_flops",
           "training_flops"]

GRAPHS = tuple(dict.fromkeys(g.name for g in GRAPH_SPECS if g.sampled))
# Forward + backward: the backward pass does two matrix products per forward product.
TRAINING_FACTOR = 3
FREQUENCY_SIZE = 256  # TimestepEmbedder's sinusoidal features
DCT_FEATURES = 64  # PixelEmbedder's 8 x 8 DCT position features


_REQUIRED = object()


def _get(config: Any, name: str, default: Any = _REQUIRED) -> Any:
    """A field of a `ModelConfig` or of a mapping of its fields (``default`` where a mapping
    leaves it out, as a manifest does for fields at their defaults; without one the field must
    be there)."""
    if default is _REQUIRED:
        return config[name] if isinstance(config, Mapping) else getattr(config, name)
    return config.get(name, default) if isinstance(config, Mapping) else getattr(
        config, name, default)


def _field(config: Any, name: str) -> int:
    return int(_get(config, name))


def _timestep_mlp(d: int) -> int:
    return 2 * (FREQUENCY_SIZE * d + d * d)


def graph_flops(config: Any, graph: str, batch: int, height: int, width: int) -> int:
    """FLOPs of one call of ``graph`` on ``batch`` images of ``height`` x ``width``."""
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)}")
    d_model = _field(config, "hidden_size")
    p = _field(config, "patch_size")
    c = _field(config, "in_channels")
    d = _field(config, "decoder_hidden_size")
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    tokens = (height // p) * (width // p)
    pixels = height * width
    b = int(batch)
    if graph == "refresh":
        return b * _timestep_mlp(d_model)
    if graph == "text_embed":  # y_embedder's Linear; RMSNorm and the position add are free
        return b * 2 * _field(config, "text_len") * _field(config, "text_dim") * d_model
    if graph == "pixel_dit":
        final = 2 * d_model * 2 * d_model + 2 * tokens * d_model * c * p * p
        return graph_flops(config, "dit", b, height, width) + b * final
    if graph == "dit":
        depth = _field(config, "dit_depth")
        text = _get(config, "family", "c2i") == "t2i"
        # SwiGLU width, as ModelConfig.mlp_hidden_size; t2i's fused w12 + w3 count as w1, w3, w2.
        mlp = 4 * d_model if text else int(2 * (4 * d_model) / 3)
        text_len = _field(config, "text_len") if text else 0
        per_block = (2 * d_model * 6 * d_model  # adaLN on the per-sample vector
                     + 2 * tokens * d_model * 3 * d_model  # qkv
                     + 4 * tokens * (tokens + text_len) * d_model  # QK^T and AV, all keys
                     + 2 * tokens * d_model * d_model  # proj
                     + 3 * 2 * tokens * d_model * mlp)  # SwiGLU w1, w3, w2
        per_sample = (2 * tokens * c * p * p * d_model + _timestep_mlp(d_model)
                      + depth * per_block)
        if _get(config, "guidance_distilled", False):  # the guidance embedding: w's MLP as t's
            per_sample += _timestep_mlp(d_model)
        if text:
            refine = (2 * d_model * 6 * d_model + 2 * text_len * d_model * 3 * d_model
                      + 4 * text_len * text_len * d_model + 2 * text_len * d_model * d_model
                      + 3 * 2 * text_len * d_model * mlp)
            per_sample += (_field(config, "refine_depth") * refine
                           + depth * 2 * text_len * d_model * 2 * d_model)  # kv_y
        return b * per_sample
    depth = _field(config, "decoder_depth")
    cond = pixels * 2 * d_model * d
    pixel = pixels * (2 * c * d + 2 * d * d + depth * (2 * 2 * d * d + 2 * d * 3 * d) + 2 * d * c)
    position = 2 * p * p * DCT_FEATURES * d  # the DCT position term: once per call
    if graph == "decoder_cond":
        return b * cond
    if graph == "decoder_pixel":
        return b * pixel + position
    return b * (cond + pixel) + position


def sampling_flops(config: Any, cost: SamplingCost, height: int, width: int) -> int:
    """FLOPs of one whole generation from a sampling plan's ``cost`` (`SamplingPlan.cost`):
    each graph's per-sample count times the samples it ran, plus the per-call terms.

    The decoder's condition part counts on the cost's ``decoder_cond_samples`` where it ran
    apart from the pixel part (DiT sharing with the split decoder), else on every decoder
    sample; a text-to-image cost's ``text_embed_samples`` adds the once-per-generation text
    embedding.
    """
    dit = graph_flops(config, "dit", 1, height, width)
    dec_pixel_one = graph_flops(config, "decoder_pixel", 1, height, width)
    position = graph_flops(config, "decoder_pixel", 0, height, width)
    dec_cond = graph_flops(config, "decoder_cond", 1, height, width)
    dec_samples = cost.decoder_samples
    cond_samples = (dec_samples if cost.decoder_cond_samples is None
                    else cost.decoder_cond_samples)
    return (cost.dit_samples * dit
            + dec_samples * (dec_pixel_one - position) + cost.decoder_calls * position
            + cond_samples * dec_cond + text_embedding_flops(config, cost, height, width))


def text_embedding_flops(config: Any, cost: SamplingCost, height: int, width: int) -> int:
    """FLOPs of a generation's once-per-generation text embedding (the cost's
    ``text_embed_samples``); 0 for a cost without it (class-conditional, whose config has no
    text fields)."""
    samples = cost.text_embed_samples
    return samples * graph_flops(config, "text_embed", 1, height, width) if samples else 0


def training_flops(config: Any, height: int, width: int) -> int:
    """Forward + backward FLOPs of one training image: the whole network once, times
    :data:`TRAINING_FACTOR`. DeCo and its plain-DiT baseline compare at equal compute on this."""
    if _get(config, "architecture", "deco") == "dit":
        forward = graph_flops(config, "pixel_dit", 1, height, width)
    else:
        forward = graph_flops(config, "dit", 1, height, width) + graph_flops(
            config, "decoder", 1, height, width
        )
    return TRAINING_FACTOR * forward
