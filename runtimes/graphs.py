"""The graphs a bundle holds: one record per graph, the one list of them.

A graph is declared here once — its name, its inputs and outputs (dtype and symbolic axes), the
input whose batch leads, which outputs a runtime may leave out, how its shapes follow from the
model config — and everything else reads the record: the exporters (ONNX, Core ML, TensorRT)
name and shape their graphs from it, the manifest checks artifact names against it, every
backend checks a loaded graph's I/O against it, and the TensorRT profiles and Core ML shape
choices are computed from it. A new graph is one new `GraphSpec` in `GRAPH_SPECS` plus its
module in the exporter (``deco_export.export.graphs``).

Axes are symbolic: "batch", "height", "width" and "tokens" (= height/p * width/p) are
dynamic (`DYNAMIC_AXES`): one ONNX graph serves every size of the range the manifest records
(`runtimes.sizes`); "channels", "hidden", "text_len", "text_dim", "patch_pixels" and
"decoder_hidden" are fixed per export from the model config (see `axis_sizes`). Inputs and outputs
are float32 / int64 whatever the precision inside a graph. No torch, no numpy: an application
reading a bundle imports only this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import ModelConfig
from .errors import ConfigError
from .sizes import SizeRange

__all__ = [
    "DYNAMIC_AXES",
    "GRAPH_NAMES",
    "GRAPH_SPECS",
    "GUIDANCE_INPUT",
    "GraphSpec",
    "TensorSpec",
    "axis_sizes",
    "dit_condition_input",
    "get_graph",
    "graphs_for",
]


@dataclass
class TensorSpec:
    """A graph input or output: name, shape (ints, or strings for symbolic axes), dtype.

    In a record the shape is all axis names (``["batch", "channels", "height", "width"]``); in a
    manifest it is resolved for one export (``["batch", 3, 64, 64]``), the batch left dynamic.
    """

    name: str
    shape: list[int | str]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | TensorSpec) -> TensorSpec:
        if isinstance(d, TensorSpec):
            return d
        try:
            return cls(name=str(d["name"]), shape=list(d.get("shape", [])), dtype=str(d["dtype"]))
        except KeyError as exc:
            raise ConfigError(
                f"a tensor spec lacks {exc.args[0]!r} (needs name, shape, dtype): {dict(d)}"
            ) from None

    def resolve(self, sizes: Mapping[str, int | str]) -> TensorSpec:
        """This spec with each symbolic axis found in ``sizes`` replaced by its size."""
        return TensorSpec(self.name, [sizes.get(a, a) if isinstance(a, str) else a
                                      for a in self.shape], self.dtype)


DYNAMIC_AXES = ("batch", "height", "width", "tokens")
ShapeBounds = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max)
SPATIAL_AXES = ("height", "width", "tokens")


def axis_sizes(config: ModelConfig, height: int, width: int,
               batch: int | str = "batch") -> dict[str, int | str]:
    """The size of every symbolic axis for one model at one image size (and batch)."""
    p = config.patch_size
    if height % p or width % p:
        raise ConfigError(
            f"image size {height}x{width} is not a multiple of the patch size {p}; choose e.g. "
            f"{config.image_size[0]}x{config.image_size[1]}"
        )
    return {"batch": batch, "channels": config.in_channels, "height": int(height),
            "width": int(width), "tokens": config.num_tokens(height, width),
            "hidden": config.hidden_size, "text_len": config.text_len,
            "text_dim": config.text_dim, **_decoder_axes(config)}


def _decoder_axes(config: ModelConfig) -> dict[str, int]:
    """The split decoder's modulation axes: the pixels of a patch (p*p) and the decoder's
    width (decoder_hidden_size)."""
    return {"patch_pixels": config.patch_size ** 2, "decoder_hidden": config.decoder_hidden_size}


@dataclass(frozen=True)
class GraphSpec:
    """One graph's contract.

    ``primary_input`` is the input whose batch leads (Core ML enumerates its batch sizes when a
    target cannot enumerate every input jointly). ``optional_outputs`` may be missing from a
    loaded graph (the DiT's ``hidden`` only feeds the refresh graph). ``required`` graphs must
    be in a bundle for a runtime to sample; the others add features. ``families`` and
    ``architectures`` say which models have this graph. ``sampled`` graphs are the ones a
    sampling backend loads; the text encoder is not (it runs once per prompt, before sampling,
    in `runtimes.text_encoder`), so backends and exporters of the DeCo graphs skip it.
    ``calls`` are the `runtimes.backend.Backend` methods this graph answers, each with the
    output it returns; the method's arguments are the graph's inputs in order
    (`runtimes.graph_backend.GraphBackend` derives a backend's calls and capabilities from
    them). ``stage`` is the half of the model the graph runs: "dit" (the low-frequency half:
    the DiT, its text embedding, the condition refresh; a one-graph model whole), "decoder" (the
    full-resolution half) or "text" (the text encoder, before sampling): the bench times and
    counts FLOPs per stage. ``distilled`` says which models have this graph by their
    ``guidance_distilled`` flag: a guidance-distilled model's DiT takes the guidance scale as
    an input (``guidance``), every other graph serves both kinds.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    primary_input: str
    description: str
    required: bool = True
    optional_outputs: tuple[str, ...] = ()
    families: tuple[str, ...] = ("c2i",)
    architectures: tuple[str, ...] = ("deco",)
    sampled: bool = True
    calls: tuple[tuple[str, str], ...] = ()
    stage: str = "dit"
    distilled: tuple[bool, ...] = (False, True)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(s.name for s in self.inputs)
        if self.primary_input not in names:
            raise ConfigError(f"graph {self.name}: primary input {self.primary_input!r} is not "
                              f"one of its inputs {list(names)}")
        object.__setattr__(self, "_names", names)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    @property
    def required_outputs(self) -> tuple[str, ...]:
        return tuple(n for n in self.output_names if n not in self.optional_outputs)

    def applies_to(self, config: ModelConfig) -> bool:
        return (config.family in self.families and config.architecture in self.architectures
                and config.guidance_distilled in self.distilled)

    def io_specs(self, config: ModelConfig, height: int | None = None, width: int | None = None
                 ) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs as a manifest records them: the fixed axes resolved, the dynamic
        ones (`DYNAMIC_AXES`) left symbolic; with ``height`` and ``width`` (an artifact
        compiled for one size) the spatial axes resolved too."""
        sizes = axis_sizes(config, *(config.image_size if height is None or width is None
                                     else (height, width)))
        if height is None or width is None:
            sizes = {k: v for k, v in sizes.items() if k not in SPATIAL_AXES}
        return ([s.resolve(sizes) for s in self.inputs], [s.resolve(sizes) for s in self.outputs])

    def input_shapes(self, config: ModelConfig, batch: int, height: int, width: int
                     ) -> dict[str, tuple[int, ...]]:
        """Every input's concrete shape at one batch: the example inputs an exporter traces
        and checks with, and a TensorRT engine's static profile."""
        sizes = axis_sizes(config, height, width, batch)
        return {s.name: tuple(int(v) for v in s.resolve(sizes).shape) for s in self.inputs}

    def tensorrt_profiles(self, config: ModelConfig, height: int, width: int,
                          batches: Sequence[int]) -> list[tuple[int, dict[str, tuple[int, ...]]]]:
        """One static profile (min = opt = max) per engine batch, smallest first. Engines are
        built per batch bucket at the bundle's image size: a static profile is what lets
        TensorRT pick its fastest kernels, and the sampler pads a batch up to its bucket."""
        return [(n, self.input_shapes(config, n, height, width))
                for n in sorted({int(b) for b in batches})]

    def tensorrt_profile_ranges(self, config: ModelConfig, sizes: SizeRange,
                                batches: Sequence[int]
                                ) -> list[tuple[int, dict[str, ShapeBounds]]]:
        """One profile per engine batch, smallest first, for graphs whose height and width are
        dynamic: every input's (min, opt, max) shape with the batch fixed (static batch
        buckets, as `tensorrt_profiles`) and the spatial axes spanning ``sizes``, the optimum
        at its default size (the size TensorRT tunes its kernels for)."""
        (h0, w0), (h1, w1), (hd, wd) = sizes.min_size, sizes.max_size, sizes.default
        out = []
        for n in sorted({int(b) for b in batches}):
            low = self.input_shapes(config, n, h0, w0)
            opt = self.input_shapes(config, n, hd, wd)
            high = self.input_shapes(config, n, h1, w1)
            out.append((n, {k: (low[k], opt[k], high[k]) for k in opt}))
        return out

    def coreml_batch_kinds(self, num_batch_sizes: int, joint_enumeration: bool) -> dict[str, str]:
        """How each input's batch is declared to Core ML: "fixed" (one batch size),
        "enumerated" (the listed sizes) or "range" (any size between the smallest and the
        largest). Without joint enumeration (targets before iOS 18 / macOS 15) only the primary
        input enumerates and the others follow it as ranges."""
        if num_batch_sizes == 1:
            return {n: "fixed" for n in self.input_names}
        return {n: "enumerated" if joint_enumeration or n == self.primary_input else "range"
                for n in self.input_names}


def _t(name: str, *shape: str, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, list(shape), dtype)


_IMAGE = ("batch", "channels", "height", "width")
# The guidance-distilled DiT's extra input: the guidance scale w per sample, float32 (B,).
GUIDANCE_INPUT = "guidance"
_PER_TOKEN = ("batch", "tokens", "hidden")
_MODULATION = ("batch", "tokens", "patch_pixels", "decoder_hidden")
_TEXT_TOKENS = ("batch", "text_len", "hidden")

GRAPH_SPECS: tuple[GraphSpec, ...] = (
    GraphSpec(
        "dit",
        inputs=(_t("x_t", *_IMAGE), _t("t", "batch"), _t("y", "batch", dtype="int64")),
        outputs=(_t("cond", *_PER_TOKEN), _t("hidden", *_PER_TOKEN)),
        primary_input="x_t",
        optional_outputs=("hidden",),
        calls=(("dit", "cond"), ("dit_hidden", "hidden")),
        distilled=(False,),
        description="DeCo DiT: the per-token condition SiLU(e_t + h) and the hidden state h "
                    "(x_t, t, y -> cond, hidden), once per DiT step",
    ),
    # A guidance-distilled model's DiT: the guidance scale w (B,) is an input, and one
    # conditional pass gives the guided velocity (the sampler runs no unconditional half).
    GraphSpec(
        "dit",
        inputs=(_t("x_t", *_IMAGE), _t("t", "batch"), _t("y", "batch", dtype="int64"),
                _t(GUIDANCE_INPUT, "batch")),
        outputs=(_t("cond", *_PER_TOKEN), _t("hidden", *_PER_TOKEN)),
        primary_input="x_t",
        optional_outputs=("hidden",),
        calls=(("dit", "cond"), ("dit_hidden", "hidden")),
        distilled=(True,),
        description="guidance-distilled DeCo DiT: as the DiT, with the guidance scale w as an "
                    "input (x_t, t, y, guidance -> cond, hidden), once per DiT step",
    ),
    GraphSpec(
        "dit",
        inputs=(_t("x_t", *_IMAGE), _t("t", "batch"), _t("text_tokens", *_TEXT_TOKENS)),
        outputs=(_t("cond", *_PER_TOKEN), _t("hidden", *_PER_TOKEN)),
        primary_input="x_t",
        optional_outputs=("hidden",),
        families=("t2i",),
        calls=(("dit", "cond"), ("dit_hidden", "hidden")),
        distilled=(False,),
        description="DeCo text-to-image DiT: as the c2i DiT, conditioned on the embedded "
                    "text tokens of `text_embed` (x_t, t, text_tokens -> cond, hidden), once "
                    "per DiT step",
    ),
    GraphSpec(
        "dit",
        inputs=(_t("x_t", *_IMAGE), _t("t", "batch"), _t("text_tokens", *_TEXT_TOKENS),
                _t(GUIDANCE_INPUT, "batch")),
        outputs=(_t("cond", *_PER_TOKEN), _t("hidden", *_PER_TOKEN)),
        primary_input="x_t",
        optional_outputs=("hidden",),
        families=("t2i",),
        calls=(("dit", "cond"), ("dit_hidden", "hidden")),
        distilled=(True,),
        description="guidance-distilled DeCo text-to-image DiT: as the text-to-image DiT, "
                    "with the guidance scale w as an input (x_t, t, text_tokens, guidance -> "
                    "cond, hidden), once per DiT step",
    ),
    GraphSpec(
        "decoder",
        inputs=(_t("x_t", *_IMAGE), _t("cond", *_PER_TOKEN)),
        outputs=(_t("v", *_IMAGE),),
        primary_input="x_t",
        families=("c2i", "t2i"),
        calls=(("decoder", "v"),),
        stage="decoder",
        description="DeCo pixel decoder: the velocity v = x - eps (x_t, cond -> v), every step",
    ),
    GraphSpec(
        "refresh",
        inputs=(_t("hidden", *_PER_TOKEN), _t("t", "batch")),
        outputs=(_t("cond", *_PER_TOKEN),),
        primary_input="hidden",
        required=False,
        families=("c2i", "t2i"),
        calls=(("refresh_condition", "cond"),),
        description="DeCo condition refresh: SiLU(e_t + hidden) at a new t, for DiT sharing "
                    "(hidden, t -> cond)",
    ),
    # The decoder split in two for DiT sharing: on a step that reuses the DiT's condition, the
    # decoder's per-pixel condition SiLU(cond_embed(cond)) is the last DiT step's, so the
    # sampler caches it and runs only the pixel part. Optional: a bundle without them samples
    # the same, recomputing it on every step.
    GraphSpec(
        "decoder_cond",
        inputs=(_t("cond", *_PER_TOKEN),),
        outputs=(_t("modulation", *_MODULATION),),
        primary_input="cond",
        required=False,
        families=("c2i", "t2i"),
        calls=(("decoder_cond", "modulation"),),
        stage="decoder",
        description="DeCo decoder, condition part: the per-pixel condition the decoder "
                    "blocks' adaLN reads, SiLU(cond_embed(cond)) (cond -> modulation), once "
                    "per DiT step under sharing",
    ),
    GraphSpec(
        "decoder_pixel",
        inputs=(_t("x_t", *_IMAGE), _t("modulation", *_MODULATION)),
        outputs=(_t("v", *_IMAGE),),
        primary_input="x_t",
        required=False,
        families=("c2i", "t2i"),
        calls=(("decoder_pixel", "v"),),
        stage="decoder",
        description="DeCo decoder, pixel part: the velocity from x_t and a cached modulation "
                    "(x_t, modulation -> v), on the steps that reuse the DiT's condition",
    ),
    GraphSpec(
        "pixel_dit",
        inputs=(_t("x_t", *_IMAGE), _t("t", "batch"), _t("y", "batch", dtype="int64")),
        outputs=(_t("v", *_IMAGE),),
        primary_input="x_t",
        architectures=("dit",),
        calls=(("velocity", "v"),),
        description="plain pixel DiT baseline: the whole model, DiT blocks then a linear map "
                    "to each patch's pixels (x_t, t, y -> v), every step",
    ),
    # The prompt-only part of the text-to-image DiT (y_embedder + y_pos_embedding): it depends
    # on the prompt alone, so the sampler runs it once per generation (conditional and
    # unconditional rows together) and feeds its tokens to every DiT step.
    GraphSpec(
        "text_embed",
        inputs=(_t("text", "batch", "text_len", "text_dim"),),
        outputs=(_t("text_tokens", *_TEXT_TOKENS),),
        primary_input="text",
        families=("t2i",),
        calls=(("embed_text", "text_tokens"),),
        description="DeCo text-to-image text embedding: the text encoder's features to the "
                    "DiT's text tokens, y_embedder(text) + y_pos_embedding (text -> "
                    "text_tokens), once per generation",
    ),
    GraphSpec(
        "text_encoder",
        inputs=(_t("input_ids", "batch", "text_len", dtype="int64"),
                _t("attention_mask", "batch", "text_len", dtype="int64")),
        outputs=(_t("hidden", "batch", "text_len", "text_dim"),),
        primary_input="input_ids",
        required=False,
        families=("t2i",),
        sampled=False,
        stage="text",
        description="Text encoder of a text-to-image bundle: the token ids and mask of a "
                    "prompt padded to text_len (tokenizer.json) to the DiT's text features "
                    "(input_ids, attention_mask -> hidden), once per prompt",
    ),
)

GRAPH_NAMES: tuple[str, ...] = tuple(dict.fromkeys(g.name for g in GRAPH_SPECS))


def graphs_for(config: ModelConfig, sampled_only: bool = True) -> dict[str, GraphSpec]:
    """The graphs of one model, by name, in export order: the ones the sampler runs, or with
    ``sampled_only=False`` also the ones run before it (a t2i bundle's text encoder)."""
    found = {g.name: g for g in GRAPH_SPECS
             if g.applies_to(config) and (g.sampled or not sampled_only)}
    if not found:
        raise ConfigError(
            f"no graphs are declared for family {config.family!r} with architecture "
            f"{config.architecture!r}; this model runs in PyTorch only (--backend torch)"
        )
    return found


def get_graph(name: str, config: ModelConfig | None = None) -> GraphSpec:
    """The record of graph ``name`` (of ``config``'s family and architecture when given)."""
    for g in GRAPH_SPECS:
        if g.name == name and (config is None or g.applies_to(config)):
            return g
    known = list(graphs_for(config, False)) if config is not None else list(GRAPH_NAMES)
    raise ConfigError(f"unknown graph {name!r}; expected one of {known}")


def dit_condition_input(config: ModelConfig) -> str:
    """The DiT input that carries the condition for this model's family: "y" (class labels)
    or "text_tokens" (the embedded text of `text_embed`); the backends feed the sampler's
    condition to it."""
    return next(n for n in get_graph("dit", config).input_names
                if n not in ("x_t", "t", GUIDANCE_INPUT))
