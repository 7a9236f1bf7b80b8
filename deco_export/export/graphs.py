"""The PyTorch modules behind the graphs every exporter writes.

A graph's contract (names, inputs and outputs, axes, which input leads) is its record in
`runtimes.graphs`; this module adds what needs torch: the module that computes it
(`GRAPH_CLASSES`), realistic example inputs and the eager fp32 reference outputs.

* ``dit``:      (x_t, t, y)   -> (cond, hidden)   the expensive half, once per DiT step
                (x_t, t, text_tokens) for the text-to-image family; a guidance-distilled
                model's adds the guidance scale w: (x_t, t, y, guidance)
* ``text_embed``: text        -> text_tokens      text-to-image only: y_embedder(text) +
                y_pos_embedding, which depends on the prompt alone (once per generation)
* ``decoder``:  (x_t, cond)   -> v                the cheap half, every step
* ``refresh``:  (hidden, t)   -> cond             SiLU(e_t + h), for DiT sharing with a fresh t
* ``decoder_cond``:  cond                -> modulation   the decoder's condition part
* ``decoder_pixel``: (x_t, modulation)   -> v            its pixel part, on reused sharing steps

The plain pixel DiT baseline (``architecture="dit"``) has no split and exports one graph:

* ``pixel_dit``: (x_t, t, y)   -> v                the whole model, every step

Graph inputs and outputs are always float32 (and int64 labels) whatever the precision inside,
so a runtime never casts and one sampler drives every artefact. A reduced-precision graph is
exported from a copy of the model in that dtype; RMSNorm statistics, RoPE and the timestep
frequency features compute in float32 inside the model, and ONNX LayerNormalization keeps its
statistics in float32 (stash_type=1).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from runtimes.config import ModelConfig
from runtimes.graphs import GRAPH_NAMES, GUIDANCE_INPUT, TensorSpec, get_graph, graphs_for

from ..model import DeCo, PixelDiT

__all__ = [
    "GRAPH_CLASSES", "GRAPH_NAMES", "PRECISION_DTYPES", "example_inputs", "export_image_size",
    "graph_modules", "input_names", "io_specs", "output_names", "quiet", "reference_outputs",
]
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DiTGraph(nn.Module):
    """The DiT on class labels (c2i), or on the text tokens of `TextEmbedGraph` (t2i)."""

    def __init__(self, model: DeCo):
        super().__init__()
        self.dit = model.dit
        self.dtype = model.dit.s_embedder.proj.weight.dtype
        self.text_tokens = model.config.is_text_to_image

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``guidance``: the scale w, an input of a guidance-distilled model's graph only."""
        if self.text_tokens:
            cond, hidden = self.dit.forward_embedded(x_t.to(self.dtype), t, y.to(self.dtype),
                                                     guidance)
        else:
            cond, hidden = self.dit(x_t.to(self.dtype), t, y, guidance)
        return cond.float(), hidden.float()


class TextEmbedGraph(nn.Module):
    """The text-to-image DiT's prompt-only part: text features -> text tokens."""

    def __init__(self, model: DeCo):
        super().__init__()
        self.dit = model.dit

    def forward(self, text: Tensor) -> Tensor:
        return self.dit.embed_text(text).float()


class DecoderGraph(nn.Module):
    def __init__(self, model: DeCo):
        super().__init__()
        self.decoder = model.decoder
        self.dtype = model.decoder.input_proj.weight.dtype

    def forward(self, x_t: Tensor, cond: Tensor) -> Tensor:
        return self.decoder(x_t.to(self.dtype), cond.to(self.dtype)).float()


class DecoderCondGraph(nn.Module):
    """The decoder's condition part. Its output stays float32 at every precision, like every
    graph's outputs: it crosses steps in the sampler's cache."""

    def __init__(self, model: DeCo):
        super().__init__()
        self.decoder = model.decoder
        self.dtype = model.decoder.input_proj.weight.dtype

    def forward(self, cond: Tensor) -> Tensor:
        return self.decoder.modulation(cond.to(self.dtype)).float()


class DecoderPixelGraph(nn.Module):
    def __init__(self, model: DeCo):
        super().__init__()
        self.decoder = model.decoder
        self.dtype = model.decoder.input_proj.weight.dtype

    def forward(self, x_t: Tensor, modulation: Tensor) -> Tensor:
        return self.decoder.pixels(x_t.to(self.dtype), modulation.to(self.dtype)).float()


class RefreshGraph(nn.Module):
    def __init__(self, model: DeCo):
        super().__init__()
        self.dit = model.dit
        self.dtype = model.dit.s_embedder.proj.weight.dtype

    def forward(self, hidden: Tensor, t: Tensor) -> Tensor:
        return self.dit.refresh_condition(hidden.to(self.dtype), t).float()


class PixelDiTGraph(nn.Module):
    def __init__(self, model: PixelDiT):
        super().__init__()
        self.model = model
        self.dtype = model.dit.s_embedder.proj.weight.dtype

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.model(x_t.to(self.dtype), t, y).float()


GRAPH_CLASSES: dict[str, type[nn.Module]] = {
    "dit": DiTGraph, "text_embed": TextEmbedGraph, "decoder": DecoderGraph,
    "refresh": RefreshGraph,
    "decoder_cond": DecoderCondGraph, "decoder_pixel": DecoderPixelGraph,
    "pixel_dit": PixelDiTGraph,
}


def input_names(config: ModelConfig, graph: str) -> list[str]:
    """The graph's input names for this model's family (a t2i DiT takes ``text_tokens``, not ``y``),
    in the list form torch.onnx.export takes."""
    return list(get_graph(graph, config).input_names)


def output_names(config: ModelConfig, graph: str) -> list[str]:
    """The graph's output names for this model's family."""
    return list(get_graph(graph, config).output_names)


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence Python warnings and the named loggers below ERROR while converting: exporters
    report expected conditions (a missing optional package, an untested torch version) at
    length, and that drowns the export's own progress lines."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def export_image_size(config: ModelConfig, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """The (height, width) a bundle is exported at: ``image_size`` or the model's own.

    The DiT patchifies without padding, so both sides must be multiples of the patch size.
    """
    height, width = image_size or config.image_size
    if height % config.patch_size or width % config.patch_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size "
            f"{config.patch_size}; choose e.g. {config.image_size[0]}x{config.image_size[1]}"
        )
    return height, width


def graph_modules(model: DeCo, precision: str) -> dict[str, nn.Module]:
    """The graph wrappers of the model's graphs around ``model`` in ``precision``: a copy cast to
    a reduced precision, or at fp32 the CPU float32 model itself (exporting reads its weights and
    changes none, so a 4.5 GB model is not held twice)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {list(PRECISION_DTYPES)}, not {precision!r}")
    dtype = PRECISION_DTYPES[precision]
    as_is = all(p.dtype == dtype and p.device.type == "cpu"
                for p in (*model.parameters(), *model.buffers()) if p.is_floating_point())
    typed = (model if as_is else copy.deepcopy(model).to(device="cpu", dtype=dtype)).eval()
    return {name: GRAPH_CLASSES[name](typed).eval() for name in graphs_for(model.config)}


def io_specs(config: ModelConfig, graph: str, height: int | None = None,
             width: int | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A graph's inputs and outputs as the manifest records them: the batch, height, width and
    token axes left dynamic, or with ``height`` and ``width`` only the batch (an artifact
    compiled for one size)."""
    return get_graph(graph, config).io_specs(config, height, width)


def example_inputs(model: DeCo | PixelDiT, graph: str, batch: int, height: int, width: int,
                   seed: int = 0) -> tuple[Tensor, ...]:
    """Realistic float32 inputs: noise-like x_t, t in [0, 1], labels with the null class (or
    text embeddings of unit scale, as a final-norm encoder gives, and their text tokens), a
    guidance-distilled model's scales w, and the condition/hidden the fp32 DiT really produces
    for them."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    spec = get_graph(graph, cfg)
    # The model's first graph takes (x_t, t, y): the DiT, or the plain DiT baseline's only graph.
    first = next(iter(graphs_for(cfg).values()))
    shapes = first.input_shapes(cfg, batch, height, width)
    values = {"x_t": torch.randn(shapes["x_t"], generator=g),
              "t": torch.rand(shapes["t"], generator=g)}
    if cfg.is_text_to_image:
        text_shape = get_graph("text_embed", cfg).input_shapes(cfg, batch, height, width)
        values["text"] = torch.randn(text_shape["text"], generator=g)
        with torch.no_grad():
            values["text_tokens"] = model.dit.embed_text(values["text"])
    else:
        values["y"] = torch.randint(0, cfg.num_classes + 1, shapes["y"], generator=g)
        values["y"][0] = cfg.null_class
    if cfg.guidance_distilled:  # scales across the range a student is distilled on
        values[GUIDANCE_INPUT] = 1.0 + 5.0 * torch.rand(shapes[GUIDANCE_INPUT], generator=g)
    condition = values.get("text", values.get("y"))
    if not set(spec.input_names) <= set(values):  # the DiT's outputs feed the other graphs
        with torch.no_grad():
            values["cond"], values["hidden"] = model.dit(values["x_t"], values["t"], condition,
                                                         values.get(GUIDANCE_INPUT))
            if "modulation" in spec.input_names:
                values["modulation"] = model.decoder.modulation(values["cond"])
    return tuple(values[name] for name in spec.input_names)


def reference_outputs(model: DeCo, graph: str, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """PyTorch eager fp32 outputs for a graph: what every export is compared with."""
    with torch.no_grad():
        out = GRAPH_CLASSES[graph](model)(*inputs)
    return list(out) if isinstance(out, tuple) else [out]
