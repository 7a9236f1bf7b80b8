"""ONNX export: the DiT, the pixel decoder and the refresh graph as separate ONNX files.

Each graph is exported with the dynamo exporter, its batch, height, width and token axes
dynamic over the bundle's size range (the RoPE tables are computed in the graph from its
input's shape), checked with ``onnx.checker`` (full check), run in ONNX Runtime against PyTorch
eager at batch 1 and batch > 1 at two sizes of the range (the default and a non-square one),
and then the whole sampler runs end to end through ONNX Runtime from the same noise as PyTorch
at both sizes. A range of one size exports fixed-size graphs, as before sizes were dynamic.
Only an export that passes the gate (deco_export.parity) is moved into the bundle; a failing
one leaves nothing behind and an existing bundle untouched.

``int8`` is the fp32 graph with ONNX Runtime's dynamic quantization applied
(`deco_export.export.quantize`: 7-bit int8 weights per output channel by default, which every
x86 kernel computes exactly; activations quantized to uint8 per call from their own range).
It needs no calibration data, runs on any CPU (integer dot products: the decoder's 32-wide
GEMMs and the DiT's projections), and is held to the same end-to-end gate as every precision
(40 dB against PyTorch fp32); the manifest records the settings and the CPU the gate ran on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from runtimes.bundle import ONNX_PRECISIONS
from runtimes.errors import ConfigError
from runtimes.graphs import GraphSpec, get_graph
from runtimes.sizes import SizeRange

from ..model import DeCo
from ..parity import GraphParity, check_graph_gate, max_abs_error, psnr
from . import bundle_io
from .graphs import (
    example_inputs,
    export_image_size,
    graph_modules,
    input_names,
    output_names,
    quiet,
    reference_outputs,
)
from .onnx_tools import check_onnx, onnx_file_name, ort_session, tool_versions
from .options import ExportOptions
from .quantize import Int8Settings, quantize_int8
from .trace_cache import export_onnx_file

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = (18, 19, 20, 21, 22, 23)
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph itself
PARITY_BATCHES = (1, 3)
QUANTIZED_FROM = {"int8": "fp32"}  # quantized precision -> the precision its graph is exported in


def dynamic_shapes(record: GraphSpec, sizes: SizeRange | None) -> tuple[dict[int, Any], ...]:
    """torch.export dims of each input, by position (the module's argument names differ): the
    batch always; with a range of several sizes also height and width (multiples of the patch
    over the range) and the token count, which follows from them where the graph sees an image
    and is its own range elsewhere (the refresh graph)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes: dict[str, Any] = {"batch": batch}
    if sizes is not None and not sizes.is_fixed:
        p = sizes.multiple
        (h0, w0), (h1, w1) = sizes.min_size, sizes.max_size
        axes["height"] = p * torch.export.Dim("grid_h", min=h0 // p, max=h1 // p)
        axes["width"] = p * torch.export.Dim("grid_w", min=w0 // p, max=w1 // p)
        has_image = any("height" in s.shape for s in record.inputs)
        axes["tokens"] = (torch.export.Dim.AUTO if has_image else
                          torch.export.Dim("tokens", min=(h0 // p) * (w0 // p),
                                           max=(h1 // p) * (w1 // p)))
    return tuple({i: axes[a] for i, a in enumerate(s.shape) if isinstance(a, str) and a in axes}
                 for s in record.inputs)


def name_axes(path: Path, record: GraphSpec) -> None:
    """Give the graph's symbolic input and output dimensions the record's axis names
    ("height", not the exporter's "16*grid_h"), so tools and readers see one vocabulary."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    specs = {s.name: s for s in (*record.inputs, *record.outputs)}
    changed = False
    for value in (*model.graph.input, *model.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        for dim, axis in zip(value.type.tensor_type.shape.dim, spec.shape, strict=False):
            if isinstance(axis, str) and dim.HasField("dim_param") and dim.dim_param != axis:
                dim.dim_param = axis
                changed = True
    if changed:
        onnx.save(model, str(path))


def export_graph(module: torch.nn.Module, graph: GraphSpec | str, inputs: tuple, path: Path,
                 opset: int, external_data: bool, sizes: SizeRange | None = None) -> None:
    """Trace ``module`` into the ONNX graph its record declares (input and output names, batch
    and size axes). ``graph``: the record (`get_graph(name, config)`, for the model's family),
    or a name for the class-conditional record. ``sizes``: the range the height and width
    axes span (None or one size: fixed-size graphs). A trace made before of the same module
    comes from the cache (`trace_cache`)."""
    record = graph if isinstance(graph, GraphSpec) else get_graph(graph)
    names = list(record.input_names)
    dynamic = dynamic_shapes(record, sizes)
    # The exporter logs a warning per torchvision op it cannot register when torchvision is
    # absent; DeCo uses none of them, so the notice is noise in every export's output.
    with quiet("torch.onnx._internal.exporter._registration"):
        export_onnx_file(module, inputs, path, opset=opset, input_names=names,
                         output_names=list(record.output_names), dynamic_shapes=dynamic,
                         external_data=external_data)
    name_axes(path, record)


def graph_parity(model: DeCo, graph: str, path: Path, height: int, width: int,
                 seed: int, sizes: Sequence[tuple[int, int]] | None = None) -> list[GraphParity]:
    """Each output of the ONNX graph against PyTorch eager fp32, at batch 1 and batch 3, at
    each of ``sizes`` (default only ``height`` x ``width``)."""
    session = ort_session(path)
    results = []
    names = input_names(model.config, graph)
    for h, w in sizes or [(height, width)]:
        for batch in PARITY_BATCHES:
            inputs = example_inputs(model, graph, batch, h, w, seed=seed + batch)
            expected = reference_outputs(model, graph, inputs)
            feeds = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
            got = session.run(None, feeds)
            for name, ref, out in zip(output_names(model.config, graph), expected, got,
                                      strict=True):
                label = graph if len(got) == 1 else f"{graph}.{name}"
                ref_np = ref.numpy()
                results.append(GraphParity(label, batch, max_abs_error(ref_np, out),
                                           psnr(ref_np, out), h, w))
    return results


def trace_size(sizes: SizeRange) -> tuple[int, int]:
    """The size the graphs are traced at: a non-square one of the range with at least two
    tokens per side when there is one, so the exporter cannot take the two axes (or a
    one-token side) for constants."""
    p = sizes.multiple
    for h, w in reversed(sizes.parity_sizes()):
        if h != w and min(h, w) >= 2 * p:
            return h, w
    return sizes.default


def export_onnx(
    model: DeCo,
    bundle: str | Path,
    options: ExportOptions | None = None,
    *,
    precisions: Sequence[str] = ("fp32",),
    opset: int = DEFAULT_OPSET,
    text_encoder: Any = None,
    size_range: SizeRange | None = None,
    int8: Int8Settings | None = None,
    text_encoder_precisions: Sequence[str] = ("fp32",),
    **shared: Any,
) -> Path:
    """Export ``model`` into ``bundle`` (created, or extended if it is a bundle of the same
    checkpoint) and return its path. ``options`` (or the same fields as keywords, ``shared``)
    are every exporter's settings (`ExportOptions`: export size, source record, parity gate,
    progress, ``force``, negative prompt).

    ``size_range``: the image sizes the graphs serve (default `SizeRange.around` the export
    size: half to twice each side); its default must be the export size. A range of one size
    exports fixed-size graphs. ``int8``: how int8 graphs are quantized (default
    `Int8Settings()`).

    With ``text_encoder`` (a `deco_export.text_encoders.TransformersTextEncoder`) a
    text-to-image bundle also gets ``text_encoder.onnx`` + ``tokenizer.json``, and the
    negative prompt (the empty prompt by default) is encoded with it when its embeddings are
    not given; ``text_encoder_precisions`` adds the encoder at fp16 and/or int8, each gated
    on its features (`export.text_encoder`).
    """
    opts = ExportOptions.of(options, shared, "export_onnx")
    image_size, source, force = opts.image_size, opts.source, opts.force
    parity_steps, seed, say = opts.parity_steps, opts.seed, opts.say
    negative_prompt_embeds, negative_prompt = opts.negative_prompt_embeds, opts.negative_prompt
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"opset {opset} is not supported; use 18 (portable) or 23 (native Attention op). "
            "Opset 17 from the dynamo exporter writes graphs ONNX Runtime rejects"
        )
    model = model.float().cpu().eval()
    height, width = export_image_size(model.config, image_size)
    sizes = size_range or SizeRange.around((height, width), model.config.patch_size)
    if sizes.default != (height, width) or sizes.multiple != model.config.patch_size:
        raise ConfigError(
            f"the size range {sizes.describe()} (default {sizes.default[0]}x{sizes.default[1]}, "
            f"multiple {sizes.multiple}) must have the export size {height}x{width} as default "
            f"and the patch size {model.config.patch_size} as multiple"
        )
    dynamic = not sizes.is_fixed
    checked = sizes.parity_sizes()
    traced = trace_size(sizes)
    if text_encoder is None and set(text_encoder_precisions) - {"fp32"}:
        raise ValueError("text_encoder_precisions: this export has no text encoder; give "
                         "text_encoder= (--text-encoder DIR or 'minilm')")
    if text_encoder is not None:
        cfg = model.config
        if not cfg.is_text_to_image or (text_encoder.max_length, text_encoder.dim) != (
                cfg.text_len, cfg.text_dim):
            raise ValueError(
                f"the text encoder gives {text_encoder.max_length} x {text_encoder.dim} "
                f"features; this model takes {cfg.text_len} x {cfg.text_dim} (text-to-image "
                "models only)"
            )
        if negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt_embeds = text_encoder.encode([negative_prompt])
    with bundle_io.BundleTransaction(bundle, model.config, (height, width), source,
                                     force=force,
                                     negative_prompt_embeds=negative_prompt_embeds,
                                     negative_prompt=negative_prompt,
                                     sizes=sizes if dynamic else None) as txn:
        if text_encoder is not None:
            from .text_encoder import export_text_encoder

            export_text_encoder(text_encoder, txn, opset, say, text_encoder_precisions, int8)
        for precision in precisions:
            if precision not in ONNX_PRECISIONS:
                raise ValueError(f"ONNX precision must be one of {list(ONNX_PRECISIONS)}, "
                                 f"not {precision!r}")
            modules = graph_modules(model, QUANTIZED_FROM.get(precision, precision))
            weight_bytes = max(sum(p.numel() * p.element_size() for p in m.parameters())
                               for m in modules.values())
            external = weight_bytes > EXTERNAL_DATA_BYTES
            parity: list[GraphParity] = []
            files: dict[str, Path] = {}
            for graph in modules:
                record = get_graph(graph, model.config)  # the one look-up of this graph
                name = onnx_file_name(graph, precision)
                say(f"exporting {name} (opset {opset})")
                path = txn.staging / name
                started = time.perf_counter()
                inputs = example_inputs(model, graph, 2, *traced, seed=seed)
                export_graph(modules[graph], record, inputs, path, opset, external, sizes)
                details = {"opset": opset, "exporter": "torch.onnx dynamo",
                           "external_data": external}
                if precision in QUANTIZED_FROM:
                    settings = int8 or Int8Settings()
                    say(f"quantizing {name} ({settings.describe()})")
                    details["quantization"] = quantize_int8(path, external, settings)
                check_onnx(path)
                say(f"checking {name} in ONNX Runtime against PyTorch")
                results = graph_parity(model, graph, path, height, width, seed, checked)
                parity += results
                files[graph] = path
                inputs_spec, outputs_spec = (record.io_specs(model.config) if dynamic else
                                             record.io_specs(model.config, height, width))
                txn.add_artifact(
                    runtime="onnx", graph=graph, precision=precision, path=path,
                    extra_files=sorted(p for p in txn.staging.iterdir()
                                       if p.name.startswith(name + ".") or
                                       p.name == name + ".data"),
                    inputs=inputs_spec, outputs=outputs_spec,
                    details={**details,
                             "export_seconds": round(time.perf_counter() - started, 2)},
                    parity={"graphs": [r.to_dict() for r in results]},
                    tools=tool_versions(),
                )
            check_graph_gate(precision, parity, what=f"ONNX {precision} export")
            psnrs = []
            for h, w in checked:
                say(f"sampling end to end through ONNX Runtime ({precision}, {parity_steps} "
                    f"steps, {h}x{w})")
                e2e = txn.end_to_end_parity(model, "onnxruntime", precision, parity_steps, seed,
                                            image_size=(h, w))
                psnrs.append(f"{h}x{w} {e2e['psnr_db']:.1f} dB")
            say(f"ONNX {precision}: worst graph error "
                f"{max(r.max_abs_error for r in parity):.2e}, end to end {', '.join(psnrs)}")
    return Path(bundle)
