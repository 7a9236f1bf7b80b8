"""Conversion of one graph: trace, check ranks and ops, enumerate the batch, convert to an
ML program under the precision policy. A conversion made before (the same module, inputs and
settings) is taken from ``cache_dir("coreml-conversions")``, as ONNX traces are
(`deco_export.export.trace_cache`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtimes.config import ModelConfig
from runtimes.graphs import GRAPH_SPECS, get_graph, graphs_for

from ...model import DeCo
from ..graphs import GRAPH_CLASSES, example_inputs, input_names, output_names
from ..trace_cache import store_entry, stored_entry, too_large_to_keep, trace_key
from .inspect import ProgramReport, program_report
from .precision import ALL_ISLANDS, PrecisionPolicy
from .targets import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_COMPUTE_UNITS,
    DEFAULT_TARGET,
    PRECISIONS,
    CoreMLExportError,
    compute_unit,
    deployment_target,
    import_coremltools,
    joint_enumerated_shapes,
    quiet_conversion,
    quiet_logs,
)

CACHE_KIND = "coreml-conversions"
_PACKAGE, _REPORT = "model.mlpackage", "report.json"

# The inputs that carry the enumerated batch when only one input may (from the graph records).
PRIMARY_INPUT = {g.name: g.primary_input for g in GRAPH_SPECS}


def _layer_of(node: Any) -> str:
    """Module path of a TorchScript node ("dit.blocks.0.attn"), from its scope name."""
    scope = node.scopeName() or ""
    last = scope.split("/")[-1] if scope else ""
    return last.replace("__module.", "") or "the top-level forward"


def _source_of(node: Any) -> str:
    try:
        text = node.sourceRange().strip().splitlines()
    except Exception:  # source ranges are best effort
        return ""
    return f" at {text[0].strip()}" if text else ""


def check_ranks(traced: torch.jit.ScriptModule, graph: str) -> None:
    """Refuse tensors of rank > 5 before converting, naming the layer that makes them.

    Core ML runs at most rank 5; coremltools may still convert a rank-6 reshape, and the model
    then fails on the device. Checked on the traced graph, which carries every tensor's shape.
    """
    for node in traced.inlined_graph.nodes():
        for out in node.outputs():
            ttype = out.type()
            rank = ttype.dim() if isinstance(ttype, torch._C.TensorType) else None
            if rank is not None and rank > 5:
                raise CoreMLExportError(
                    f"{graph} graph: layer {_layer_of(node)} makes a rank-{rank} tensor with "
                    f"{node.kind()}{_source_of(node)}; Core ML supports rank <= 5. Rewrite it "
                    "with at most 5 dimensions (e.g. merge batch and channels before a 6-D "
                    "reshape)"
                )


def unsupported_ops(traced: torch.jit.ScriptModule) -> list[str]:
    """"aten::op in layer a.b.c (file:line)" for each torch op coremltools has no converter
    for: what its own "not implemented" error leaves out."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    found = []
    for node in traced.inlined_graph.nodes():
        kind = node.kind()
        if kind.startswith("aten::") and _TORCH_OPS_REGISTRY.get_func(kind) is None:
            found.append(f"{kind} in layer {_layer_of(node)}{_source_of(node)}")
    return found


def input_shapes(graph: str, inputs: Sequence[torch.Tensor], batch_sizes: Sequence[int],
                 config: ModelConfig | None = None,
                 image_sizes: Sequence[tuple[int, int]] | None = None
                 ) -> dict[str, list[tuple[int, ...]]]:
    """Every shape each input takes, the default first: the batch sizes at the traced size,
    or, with ``image_sizes`` (the first the default), every batch at every image size."""
    batches = sorted(set(batch_sizes))
    if config is None or not image_sizes:
        return {name: [(b, *(int(s) for s in x.shape[1:])) for b in batches]
                for name, x in zip(input_names(config or ModelConfig(), graph), inputs,
                                   strict=True)}
    spec = get_graph(graph, config)
    out: dict[str, list[tuple[int, ...]]] = {name: [] for name in spec.input_names}
    for h, w in image_sizes:
        for b in batches:
            for name, shape in spec.input_shapes(config, b, h, w).items():
                if shape not in out[name]:
                    out[name].append(shape)
    return out


def input_types(ct: Any, graph: str, inputs: Sequence[torch.Tensor],
                batch_sizes: Sequence[int], target: Any, config: ModelConfig | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None) -> list[Any]:
    """Core ML input types with the batch (and the image size) enumerated (see the module
    docstring). An input that is not enumerated takes a range in each varying dimension.
    ``config``: the model (default a class-conditional DeCo), whose family names the inputs
    (a text-to-image DiT takes float32 ``text_tokens`` (B, L, D) where a c2i one takes labels)."""
    config_ = config or ModelConfig()
    shapes = input_shapes(graph, inputs, batch_sizes, config, image_sizes)
    count = max(len(v) for v in shapes.values())
    kinds = get_graph(graph, config_).coreml_batch_kinds(count,
                                                         joint_enumerated_shapes(ct, target))
    types = []
    for name, x in zip(input_names(config_, graph), inputs, strict=True):
        options = shapes[name]
        dtype = np.int32 if not torch.is_floating_point(x) else np.float32
        if len(options) == 1 or kinds[name] == "fixed":
            shape: Any = options[0]
        elif kinds[name] == "enumerated":
            shape = ct.EnumeratedShapes(shapes=options, default=options[0])
        else:
            dims = []
            for i, default in enumerate(options[0]):
                values = [o[i] for o in options]
                dims.append(default if min(values) == max(values) else ct.RangeDim(
                    lower_bound=min(values), upper_bound=max(values), default=default))
            shape = ct.Shape(tuple(dims))
        types.append(ct.TensorType(name=name, shape=shape, dtype=dtype))
    return types


def discard_temp_packages(*mlmodels: Any) -> None:
    """Delete the temporary ``tmp*.mlpackage`` directory coremltools writes for each converted
    or compressed model (it removes them only when the process exits, so a long export, or a
    killed one, leaves one per graph and precision in the temp dir). Call it once the model is
    saved or no longer needed."""
    for mlmodel in mlmodels:
        path = getattr(mlmodel, "package_path", None)
        if getattr(mlmodel, "is_temp_package", False) and path and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def convert_graph(module: torch.nn.Module, graph: str, inputs: Sequence[torch.Tensor], *,
                  precision: str = "fp16", target: str = DEFAULT_TARGET,
                  batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                  islands: Sequence[str] = ALL_ISLANDS,
                  compute_units: str = DEFAULT_COMPUTE_UNITS,
                  verbose: bool = False, config: ModelConfig | None = None,
                  image_sizes: Sequence[tuple[int, int]] | None = None
                  ) -> tuple[Any, ProgramReport]:
    """Trace and convert one graph wrapper; returns the MLModel (not loaded) and its report.

    ``module`` is a float32 graph wrapper (``graph_modules(model, "fp32")[graph]``); the
    precision is applied by coremltools. An fp16 conversion that leaves an fp32 operation
    outside ``islands`` is refused, naming it. ``image_sizes`` (with the model's ``config``)
    enumerates the (height, width) the package accepts, the first the default: the trace
    computes the RoPE tables and reshapes from the input's shape, so one program serves them.
    """
    ct = import_coremltools()
    if precision not in PRECISIONS:
        raise CoreMLExportError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    ml_target = deployment_target(ct, target)
    units = compute_unit(ct, compute_units)
    key = _conversion_key(ct, module, graph, inputs, precision=precision, target=target,
                          batch_sizes=tuple(batch_sizes), islands=tuple(islands),
                          compute_units=compute_units, config=config,
                          image_sizes=tuple(image_sizes or ()))
    entry = stored_entry(CACHE_KIND, key) if key else None
    if entry is not None:
        kept = _load_conversion(ct, entry, units)
        if kept is not None:
            return kept
        shutil.rmtree(entry, ignore_errors=True)  # damaged: made again below
    mlmodel, report = _convert(ct, module, graph, inputs, precision=precision,
                               ml_target=ml_target, units=units, batch_sizes=batch_sizes,
                               islands=islands, verbose=verbose, config=config,
                               image_sizes=image_sizes)
    if key:
        store_entry(CACHE_KIND, key, lambda directory: _save_conversion(mlmodel, report,
                                                                        directory))
    return mlmodel, report


def _conversion_key(ct: Any, module: torch.nn.Module, graph: str,
                    inputs: Sequence[torch.Tensor], **settings: Any) -> str | None:
    """The cache key of a conversion: the trace key of the module on its inputs plus every
    setting and coremltools' version; None for modules whose weights are too large to keep."""
    if too_large_to_keep(module):
        return None
    return trace_key(module, tuple(inputs), graph, converter="coremltools",
                     coremltools=ct.__version__, **settings)


def _save_conversion(mlmodel: Any, report: ProgramReport, directory: Path) -> None:
    with quiet_logs():
        mlmodel.save(str(directory / _PACKAGE))
    (directory / _REPORT).write_text(json.dumps(dataclasses.asdict(report)))


def _load_conversion(ct: Any, entry: Path, units: Any) -> tuple[Any, ProgramReport] | None:
    """A kept conversion as a fresh temporary package (as a conversion makes one, removed by
    `discard_temp_packages`), so the entry may be evicted while the model is in use; None
    when the entry went meanwhile or is unreadable."""
    package = Path(tempfile.mkdtemp(suffix=".mlpackage"))
    try:
        report = ProgramReport(**json.loads((entry / _REPORT).read_text()))
        shutil.copytree(entry / _PACKAGE, package, dirs_exist_ok=True)
        with quiet_logs():
            mlmodel = ct.models.MLModel(str(package), is_temp_package=True,
                                        skip_model_load=True, compute_units=units)
    except Exception:  # a damaged entry, whatever coremltools makes of it: convert again
        shutil.rmtree(package, ignore_errors=True)
        return None
    return mlmodel, report


def _convert(ct: Any, module: torch.nn.Module, graph: str, inputs: Sequence[torch.Tensor], *,
             precision: str, ml_target: Any, units: Any, batch_sizes: Sequence[int],
             islands: Sequence[str], verbose: bool, config: ModelConfig | None,
             image_sizes: Sequence[tuple[int, int]] | None) -> tuple[Any, ProgramReport]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), tuple(inputs), check_trace=False)
    check_ranks(traced, graph)
    if precision == "fp16":
        compute_precision = ct.transform.FP16ComputePrecision(
            op_selector=PrecisionPolicy(tuple(islands)))
    else:
        compute_precision = ct.precision.FLOAT32
    with quiet_conversion(verbose):
        try:
            mlmodel = ct.convert(
                traced,
                inputs=input_types(ct, graph, inputs, batch_sizes, ml_target, config,
                                   image_sizes),
                outputs=[ct.TensorType(name=name, dtype=np.float32)
                         for name in output_names(config or ModelConfig(), graph)],
                convert_to="mlprogram",
                compute_precision=compute_precision,
                minimum_deployment_target=ml_target,
                compute_units=units,
                skip_model_load=True,
            )
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            culprits = unsupported_ops(traced)
            where = f"; unsupported: {', '.join(culprits[:3])}" if culprits else ""
            raise CoreMLExportError(
                f"Core ML conversion of the {graph} graph failed: {first}{where}"
            ) from err
    report = program_report(mlmodel._mil_program, islands if precision == "fp16" else ())
    if precision == "fp32":
        report.unexpected_fp32 = []
    elif report.unexpected_fp32:
        discard_temp_packages(mlmodel)
        shown = "; ".join(report.unexpected_fp32[:5])
        more = len(report.unexpected_fp32) - 5
        raise CoreMLExportError(
            f"fp16 {graph} graph: {len(report.unexpected_fp32)} operation(s) stayed fp32 outside "
            f"the chosen islands ({shown}{f'; and {more} more' if more > 0 else ''}); "
            "coremltools keeps an op fp32 when a constant exceeds the fp16 range"
        )
    return mlmodel, report


def tracing_inputs(model: DeCo, height: int, width: int, seed: int
                   ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Batch-2 inputs of every graph from one DiT forward (``example_inputs`` runs the DiT once
    per graph, which costs more than converting the small graphs of a large model): the DiT's
    inputs (its family's condition, a guidance-distilled model's ``guidance``), its outputs and
    the decoder's modulation, each graph taking its record's inputs by name. A graph whose
    inputs the DiT does not give (t2i's ``text_embed``, on the text features) gets its own."""
    config = model.config
    dit = get_graph("dit", config)
    values = dict(zip(dit.input_names, example_inputs(model, "dit", 2, height, width,
                                                      seed=seed), strict=True))
    with torch.no_grad():
        outputs = GRAPH_CLASSES["dit"](model)(*(values[n] for n in dit.input_names))
        values.update(zip(dit.output_names, outputs, strict=True))
        values["modulation"] = model.decoder.modulation(values["cond"])
    return {graph: tuple(values[n] for n in spec.input_names)
            if set(spec.input_names) <= set(values)
            else example_inputs(model, graph, 2, height, width, seed=seed)
            for graph, spec in graphs_for(config).items() if spec.sampled}


def batch_shape_kinds(ct: Any, graph: str, target: str, sizes: Sequence[int],
                      config: ModelConfig | None = None) -> dict[str, str]:
    """How each input's batch is declared: "enumerated", "range" or "fixed" (the inputs of
    ``config``'s graph; default a class-conditional DeCo's)."""
    spec = get_graph(graph, config or ModelConfig())
    if len(sizes) == 1:
        return spec.coreml_batch_kinds(1, joint_enumeration=False)
    joint = joint_enumerated_shapes(ct, deployment_target(ct, target))
    return spec.coreml_batch_kinds(len(sizes), joint)
