"""``export_coreml``: every graph and precision converted, compressed, described, inspected
and (on macOS) gated against PyTorch, inside one bundle transaction; and the model source of
an export (a checkpoint, or the checkpoint a bundle names)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtimes.graphs import get_graph
from runtimes.sampler import release_sampler
from runtimes.sizes import SizeRange

from ...model import DeCo
from ...parity import (
    END_TO_END_MIN_PSNR,
    GraphParity,
    check_end_to_end_gate,
    check_graph_gate,
    finite,
    max_abs_error,
    psnr,
)
from .. import bundle_io
from ..graphs import (
    example_inputs,
    export_image_size,
    graph_modules,
    input_names,
    io_specs,
    output_names,
    reference_outputs,
)
from ..options import ExportOptions, Progress
from .compress import compress_model
from .convert import batch_shape_kinds, convert_graph, discard_temp_packages, tracing_inputs
from .inspect import inspect_package
from .precision import parse_islands
from .targets import (
    COMPRESSIONS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_COMPUTE_UNITS,
    DEFAULT_TARGET,
    NOT_RUN_REASON,
    PARITY_BATCHES,
    PRECISIONS,
    CoreMLExportError,
    can_predict,
    compute_unit,
    deployment_target,
    import_coremltools,
    quiet_logs,
)

DEFAULT_LICENSE = (
    "Weights: the licence of the source checkpoint. Export code: Apache-2.0 (deco-export)."
)

TENSOR_DESCRIPTIONS = {
    "x_t": "noisy image (B, C, H, W), float32; t = 0 is pure noise, t = 1 data",
    "t": "time (B,) in [0, 1], float32",
    "y": "class label (B,), int32; num_classes is the null (unconditional) class",
    "guidance": "guidance scale w (B,), float32, of a guidance-distilled model: one pass gives "
                "the guided velocity (1: the conditional one)",
    "text": "text encoder features (B, L, C), float32, right-padded to L; the bundle's "
            "negative_prompt.npy is the unconditional row",
    "text_tokens": "the DiT's text tokens y_embedder(text) + y_pos_embedding (B, L, D), "
                   "float32, from the text_embed package once per generation",
    "hidden": "last DiT block output h (B, L, D), float32",
    "cond": "per-token condition SiLU(e_t + h) (B, L, D), float32",
    "v": "velocity x - noise (B, C, H, W), float32",
    "modulation": "the decoder blocks' per-pixel condition SiLU(cond_embed(cond)) "
                  "(B, L, p*p, d), float32",
}


def coreml_file_name(graph: str, precision: str) -> str:
    """``dit.mlpackage`` for fp32 and ``dit.fp16.mlpackage`` for fp16, as the ONNX names."""
    return f"{graph}.mlpackage" if precision == "fp32" else f"{graph}.{precision}.mlpackage"


def describe_model(mlmodel: Any, model: DeCo, graph: str, precision: str, *,
                   image_size: tuple[int, int], batch_sizes: Sequence[int], target: str,
                   compute_units: str, compression: str, islands: Sequence[str],
                   license: str, source: dict[str, Any] | None,
                   image_sizes: Sequence[tuple[int, int]] = ()) -> None:
    """Write the model metadata Xcode and ``MLModel.get_spec()`` show: author, licence,
    version, descriptions of every input and output, and the DeCo config as JSON."""
    from ... import __version__

    mlmodel.author = f"deco-export {__version__}"
    mlmodel.license = license
    mlmodel.version = __version__
    mlmodel.short_description = get_graph(graph, model.config).description
    for name in input_names(model.config, graph):
        mlmodel.input_description[name] = TENSOR_DESCRIPTIONS[name]
    for name in output_names(model.config, graph):
        mlmodel.output_description[name] = TENSOR_DESCRIPTIONS[name]
    user = {
        "deco.graph": graph,
        "deco.precision": precision,
        "deco.config": json.dumps(model.config.to_dict() | {"image_size": list(image_size)},
                                  sort_keys=True),
        "deco.image_size": f"{image_size[0]}x{image_size[1]}",
        "deco.image_sizes": ",".join(f"{h}x{w}" for h, w in image_sizes or [image_size]),
        "deco.batch_sizes": ",".join(str(b) for b in batch_sizes),
        "deco.deployment_target": target,
        "deco.compute_units": compute_units,
        "deco.compression": compression,
        "deco.fp32_islands": ",".join(islands) if precision == "fp16" else "all (fp32)",
        "deco.version": __version__,
    }
    if source and source.get("sha256"):
        user["deco.source_sha256"] = str(source["sha256"])
    mlmodel.user_defined_metadata.update(user)


def tool_versions() -> dict[str, str]:
    ct = import_coremltools()
    return {"torch": torch.__version__, "coremltools": ct.__version__, "numpy": np.__version__}


def normalise_batch_sizes(extra: Sequence[int] = ()) -> tuple[int, ...]:
    sizes = sorted({*DEFAULT_BATCH_SIZES, *(int(b) for b in extra)})
    if sizes[0] < 1 or len(sizes) > 128:
        raise CoreMLExportError(
            f"batch sizes must be positive and at most 128 of them (Core ML's limit on "
            f"enumerated shapes), got {sizes}"
        )
    return tuple(sizes)


def export_coreml(
    model: DeCo,
    bundle: str | Path,
    options: ExportOptions | None = None,
    *,
    precisions: Sequence[str] = ("fp16",),
    target: str = DEFAULT_TARGET,
    batch_sizes: Sequence[int] = (),
    compute_units: str = DEFAULT_COMPUTE_UNITS,
    compression: str = "none",
    fp32_islands: str | Sequence[str] | None = None,
    license: str | None = None,
    verbose: bool = False,
    image_sizes: Sequence[tuple[int, int]] = (),
    **shared: Any,
) -> Path:
    """Export ``model`` as Core ML packages into ``bundle`` (created or extended); its path.
    ``options`` (or the same fields as keywords, ``shared``) are every exporter's settings
    (`ExportOptions`: export size, source record, parity gate, progress, ``force``, negative
    prompt).

    ``image_sizes`` are (height, width) sizes the packages accept beside the export size (the
    default): Core ML enumerates them (``EnumeratedShapes``; a fixed size is the fast path on
    the Neural Engine, so none are added unless asked). The manifest records the list in each
    artifact's ``details["sizes"]``, which the runtime checks a size against.

    ``batch_sizes`` are added to (1, 2). ``compute_units`` is recorded for the runtime (the
    package runs on any). ``compression`` is "none", "int8", "palette6" or "palette4".
    ``fp32_islands`` picks what stays fp32 in fp16 packages ("all", "none" or names from
    `FP32_ISLANDS`; "none" suits CPU_AND_NE, where fp32 work leaves the Neural Engine).

    A text-to-image model's packages take the text encoder's features; the bundle stores the
    encoded negative prompt as the ONNX export does (``negative_prompt.npy``, named in the
    manifest's "text" section), so the unconditional half needs no encoder. Exporting into a
    bundle that already stores one keeps it.
    """
    opts = ExportOptions.of(options, shared, "export_coreml")
    image_size, source, force = opts.image_size, opts.source, opts.force
    parity_steps, seed, say = opts.parity_steps, opts.seed, opts.say
    negative_prompt_embeds, negative_prompt = opts.negative_prompt_embeds, opts.negative_prompt
    if not model.config.has_decoder:
        raise CoreMLExportError(
            "the plain DiT baseline exports to ONNX only (one graph, pixel_dit); use "
            "`deco export onnx`"
        )
    ct = import_coremltools()
    for precision in precisions:
        if precision not in PRECISIONS:
            raise CoreMLExportError(
                f"Core ML precision must be one of {PRECISIONS}, not {precision!r}"
            )
    deployment_target(ct, target)
    compute_unit(ct, compute_units)
    if compression not in COMPRESSIONS:
        raise CoreMLExportError(
            f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}"
        )
    islands = parse_islands(fp32_islands)
    sizes = normalise_batch_sizes(batch_sizes)
    model = model.float().cpu().eval()
    try:
        height, width = export_image_size(model.config, image_size)
    except ValueError as exc:
        raise CoreMLExportError(str(exc)) from None
    served = enumerated_sizes(model.config.patch_size, (height, width), image_sizes,
                              len(sizes))
    checked = served.parity_sizes()
    licence = license or (source or {}).get("license") or DEFAULT_LICENSE
    modules = graph_modules(model, "fp32")
    trace_inputs = tracing_inputs(model, height, width, seed)
    with bundle_io.BundleTransaction(bundle, model.config, (height, width), source,
                                     force=force, negative_prompt_embeds=negative_prompt_embeds,
                                     negative_prompt=negative_prompt) as txn:
        for precision in precisions:
            parity: list[GraphParity] = []
            for graph in modules:  # the graphs of this model, in the records' order
                name = coreml_file_name(graph, precision)
                say(f"converting {name} ({target}, batch {','.join(map(str, sizes))}"
                    f"{', ' + compression if compression != 'none' else ''})")
                started = time.perf_counter()
                mlmodel, report = convert_graph(
                    modules[graph], graph, trace_inputs[graph], precision=precision, target=target,
                    batch_sizes=sizes, islands=islands, compute_units=compute_units,
                    verbose=verbose, config=model.config,
                    image_sizes=None if served.is_fixed else served.enumerated)
                convert_seconds = time.perf_counter() - started
                converted = mlmodel
                try:
                    mlmodel, compression_record = compress_model(converted, compression, target,
                                                                  verbose=verbose)
                    describe_model(mlmodel, model, graph, precision, image_size=(height, width),
                                   batch_sizes=sizes, target=target,
                                   compute_units=compute_units, compression=compression,
                                   islands=islands, license=licence, source=source,
                                   image_sizes=served.enumerated or ())
                    path = txn.staging / name
                    with quiet_logs():
                        mlmodel.save(str(path))
                finally:
                    discard_temp_packages(converted, mlmodel)
                structure = inspect_package(path)
                details = {
                    "format": "mlprogram",
                    "converter": "coremltools (torch.jit.trace)",
                    "deployment_target": target,
                    "specification_version": structure["specification_version"],
                    "compute_units": compute_units,
                    "batch_sizes": list(sizes),
                    "batch_shapes": batch_shape_kinds(ct, graph, target, sizes, model.config),
                    "sizes": served.to_dict(),
                    "compute_precision": precision,
                    "fp32_islands": {n: report.islands.get(n, 0) for n in islands}
                    if precision == "fp16" else "all",
                    "compute_ops": report.compute_ops,
                    "op_counts": structure["op_counts"],
                    "compression": compression_record,
                    "constexpr_ops": structure["constexpr_ops"],
                    "weight_bytes": structure["weight_bytes"],
                    "convert_seconds": round(convert_seconds, 2),
                    "export_seconds": round(time.perf_counter() - started, 2),
                }
                graph_figures: dict[str, Any]
                if can_predict():
                    say(f"checking {name} in Core ML against PyTorch")
                    results = [r for h, w in checked
                               for r in graph_parity(model, graph, path, h, w, seed,
                                                     compute_units)]
                    parity += results
                    graph_figures = {"graphs": [r.to_dict() for r in results]}
                else:
                    graph_figures = {"status": "not run",
                                     "reason": NOT_RUN_REASON.format(platform=sys.platform)}
                inputs_spec, outputs_spec = (coreml_io_specs(model, graph) if not served.is_fixed
                                             else coreml_io_specs(model, graph, height, width))
                txn.add_artifact(
                    runtime="coreml", graph=graph, precision=precision, path=path,
                    inputs=inputs_spec, outputs=outputs_spec, details=details,
                    parity=graph_figures, tools=tool_versions(),
                )
                say(f"{name}: {report.compute_ops.get('fp16', 0)} fp16 / "
                    f"{report.compute_ops.get('fp32', 0)} fp32 compute ops, "
                    f"{structure['weight_bytes'] / 1e6:.1f} MB weights, "
                    f"{convert_seconds:.1f} s")
            if can_predict():
                for size in checked:
                    end_to_end(txn, model, precision, compression, parity, parity_steps, seed,
                               compute_units, sizes, say, size)
            else:
                txn.record_end_to_end("coreml", precision, {
                    "status": "not run", "reason": NOT_RUN_REASON.format(platform=sys.platform)})
    return Path(bundle)


def enumerated_sizes(patch: int, default: tuple[int, int], extra: Sequence[tuple[int, int]],
                     num_batches: int) -> SizeRange:
    """The sizes a package serves: the default first, then ``extra``, each a multiple of the
    patch; at most 128 shapes (sizes x batches), Core ML's limit on an enumeration."""
    listed = list(dict.fromkeys([tuple(default), *(tuple(int(v) for v in s) for s in extra)]))
    bad = [s for s in listed if len(s) != 2 or min(s) < patch or s[0] % patch or s[1] % patch]
    if bad:
        raise CoreMLExportError(
            f"image size {bad[0][0]}x{bad[0][1]} is not a positive multiple of the patch size "
            f"{patch}; list sizes such as {default[0]}x{default[1]}"
        )
    if len(listed) * num_batches > 128:
        raise CoreMLExportError(
            f"{len(listed)} sizes x {num_batches} batch sizes make {len(listed) * num_batches} "
            "enumerated shapes, more than Core ML's 128; list fewer sizes or batch sizes"
        )
    low = (min(s[0] for s in listed), min(s[1] for s in listed))
    high = (max(s[0] for s in listed), max(s[1] for s in listed))
    return SizeRange(low, high, listed[0], patch, tuple(listed))  # type: ignore[arg-type]


def coreml_io_specs(model: DeCo, graph: str, height: int | None = None,
                    width: int | None = None) -> tuple[list[dict], list[dict]]:
    """The shared I/O specs with Core ML's int32 labels (the spatial axes symbolic when the
    package enumerates several sizes)."""
    inputs, outputs = io_specs(model.config, graph, height, width)
    ins = [dict(s.to_dict(), dtype="int32" if s.dtype == "int64" else s.dtype) for s in inputs]
    return ins, [s.to_dict() for s in outputs]


def graph_parity(model: DeCo, graph: str, path: Path, height: int, width: int, seed: int,
                 compute_units: str = DEFAULT_COMPUTE_UNITS) -> list[GraphParity]:
    """Each output of a Core ML package against PyTorch eager fp32 (macOS only)."""
    ct = import_coremltools()
    mlmodel = ct.models.MLModel(str(path), compute_units=compute_unit(ct, compute_units))
    results = []
    for batch in PARITY_BATCHES:  # at one image size; the export calls it per checked size
        inputs = example_inputs(model, graph, batch, height, width, seed=seed + batch)
        expected = reference_outputs(model, graph, inputs)
        feeds = {name: x.numpy().astype(np.int32 if not torch.is_floating_point(x)
                                        else np.float32)
                 for name, x in zip(input_names(model.config, graph), inputs, strict=True)}
        got = mlmodel.predict(feeds)
        for name, ref in zip(output_names(model.config, graph), expected, strict=True):
            label = graph if len(expected) == 1 else f"{graph}.{name}"
            ref_np, out = ref.numpy(), np.asarray(got[name], dtype=np.float32)
            results.append(GraphParity(label, batch, max_abs_error(ref_np, out),
                                       psnr(ref_np, out), height, width))
    return results


def end_to_end(txn: bundle_io.BundleTransaction, model: DeCo, precision: str, compression: str,
               parity: list[GraphParity], steps: int, seed: int, compute_units: str,
               batch_sizes: Sequence[int], say: Progress,
               image_size: tuple[int, int] | None = None) -> None:
    """Gate one precision's packages (macOS): per graph, then the sampler end to end.

    Uncompressed packages take the ONNX gates for their precision. Compressed weights change
    the function itself, so their graph errors are reported, not gated, and their images must
    reach the fp16 end-to-end gate whatever the compute precision.
    """
    what = f"Core ML {precision} export"
    height, width = image_size or txn.image_size
    if compression == "none":
        check_graph_gate(precision, parity, what=what)
        say(f"sampling end to end through Core ML ({precision}, {steps} steps, {height}x{width})")
        figures = txn.end_to_end_parity(model, "coreml", precision, steps, seed,
                                        image_size=(height, width),
                                        compute_units=compute_units)
    else:
        from runtimes import DeCoPipeline
        from runtimes.backends.coreml import CoreMLBackend

        say(f"sampling end to end through Core ML ({precision}, {compression}, {steps} steps)")
        paths = {a.graph: txn.staging / a.file for a in txn.artifacts
                 if (a.runtime, a.precision) == ("coreml", precision)}
        backend = CoreMLBackend.from_packages(paths, compute_units=compute_units,
                                              batch_sizes=batch_sizes, model=model.config)
        pipe = DeCoPipeline(backend, model.config,
                            release_sampler(model.config.family))
        figures = bundle_io.end_to_end_figures(model, pipe, (height, width), steps, seed)
        threshold = END_TO_END_MIN_PSNR["fp16"]
        check_end_to_end_gate("fp16", figures["psnr_db"], what=f"{what} ({compression})")
        txn.record_end_to_end("coreml", precision, {
            **figures, "psnr_db": finite(figures["psnr_db"]), "threshold_db": threshold,
            "compression": compression})
    worst = max((r.max_abs_error for r in parity), default=math.nan)
    say(f"Core ML {precision}: worst graph error {worst:.2e}, end to end "
        f"{figures['psnr_db']:.1f} dB")


def load_source(spec: str, weights: str = "ema", checkpoint: str | None = None
                ) -> tuple[DeCo, dict[str, Any], tuple[int, int] | None]:
    """(model, source record, image size) from a checkpoint or from an exported bundle.

    A bundle does not hold PyTorch weights: its manifest names the checkpoint it was exported
    from (with its sha256), which is loaded and checked against the bundle's model; pass
    ``checkpoint`` when that path is not valid on this machine.
    """
    from runtimes import bundle as rb

    from ...sources import bundle_source, is_bundle, load_model

    if not is_bundle(spec):
        model, source = load_model(checkpoint or spec, weights=weights)
        return model, source, None
    manifest = rb.read_manifest(spec)
    try:
        model, source = bundle_source(spec, manifest, checkpoint,
                                      use="a Core ML export converts that PyTorch model")
    except ValueError as exc:
        raise CoreMLExportError(str(exc)) from None
    return model, source, manifest.model.image_size
