"""Core ML export: the DiT, the pixel decoder and the refresh graph as ML program packages.

Files (next to the ONNX graphs in the same bundle; fp32 has no suffix, as for ONNX)::

    dit.fp16.mlpackage  decoder.fp16.mlpackage  refresh.fp16.mlpackage   (default)
    dit.mlpackage       decoder.mlpackage       refresh.mlpackage        (--precision fp32)

Weight compression does not change the name: a bundle holds one Core ML artefact per graph and
precision, and the manifest's ``details.compression`` says how it was compressed.

How a graph is made:

* The fp32 graph wrapper (float32 I/O, see ``graphs.py``) is traced with ``torch.jit.trace``
  and converted to an ML program. fp16 is chosen here, per operation, by coremltools'
  ``FP16ComputePrecision`` rather than by tracing an fp16 copy: the op selector keeps the
  numerically sensitive operations in fp32 ("fp32 islands", see `FP32_ISLANDS`) and everything
  else runs in fp16. The islands are found through the TorchScript module scopes coremltools
  keeps on every MIL operation, so they follow the model's structure, not operation names.
* The batch is flexible through enumerated shapes (1 and 2 for classifier-free guidance, plus
  any sizes asked for). Core ML before iOS 18 / macOS 15 allows enumerated shapes on one input
  only: there the image-like input (``x_t``, or ``hidden`` for refresh) is enumerated and the
  other batch-carrying inputs get a bounded range; since every input shares the batch, the
  enumerated input decides which batches run. From iOS 18 / macOS 15 all inputs are enumerated
  together.
* Labels are int32 (Core ML has no int64 inputs); graph outputs are float32 and named.
* Optional weight compression after conversion: 8-bit linear (per-channel symmetric) or 6- and
  4-bit palettisation (1-D k-means look-up tables; per tensor, or per group of 16 output
  channels from iOS 18 / macOS 15 on). Only learned weights are compressed; the RoPE tables and
  the decoder's folded DCT position term keep their precision. `compress_package` compresses a
  saved package without converting again.

On Linux coremltools converts and saves but cannot predict, so the export records the
structure (inputs, shapes, operation counts by precision, fp32 islands, compression) and marks
parity "not run". On macOS every graph is compared with PyTorch and the whole sampler runs end
to end through the Core ML backend against PyTorch fp32 under the same gate as ONNX.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtimes.errors import DecoError

from ..model import DeCo
from ..parity import (
    END_TO_END_MIN_PSNR,
    GraphParity,
    check_end_to_end_gate,
    check_graph_gate,
    finite,
    max_abs_error,
    psnr,
)
from . import bundle_io
from .graphs import (
    GRAPH_NAMES,
    INPUT_NAMES,
    OUTPUT_NAMES,
    example_inputs,
    export_image_size,
    graph_modules,
    io_specs,
    quiet,
    reference_outputs,
)

INSTALL_HINT = "pip install 'deco-export[coreml]'"
PRECISIONS = ("fp16", "fp32")
DEPLOYMENT_TARGETS = ("macOS14", "macOS15", "macOS26", "iOS17", "iOS18", "iOS26")
DEFAULT_TARGET = "macOS14"
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
DEFAULT_COMPUTE_UNITS = "ALL"
COMPRESSIONS = ("none", "int8", "palette6", "palette4")
DEFAULT_BATCH_SIZES = (1, 2)
PARITY_BATCHES = (1, 2)
WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller tensors (norm weights, biases) stay
PALETTE_GROUP_SIZE = 16
HISTOGRAM_BINS = 4096  # palettes are clustered on a histogram this fine
DEFAULT_LICENSE = (
    "Weights: the licence of the source checkpoint. Export code: Apache-2.0 (deco-export)."
)

#: fp32 islands of an fp16 export, by name: what stays fp32 and why.
FP32_ISLANDS: dict[str, str] = {
    "rmsnorm": "RMSNorm x^2, mean, rsqrt and scale: x^2 overflows fp16 above |x| = 256",
    "layernorm": "the pixel decoder's LayerNorm (mean and variance over 32 channels)",
    "rope": "the RoPE rotation of q and k, computed in fp32 by the reference",
    "timestep": "the sinusoidal timestep features (t in [0, 1] needs more than fp16's 11 bits)",
}
ALL_ISLANDS = tuple(FP32_ISLANDS)

GRAPH_DESCRIPTIONS = {
    "dit": "DeCo DiT: noisy image, time and label -> per-token condition and last hidden state",
    "decoder": "DeCo pixel decoder: noisy image and per-token condition -> velocity",
    "refresh": "DeCo condition refresh: cached hidden state and a new time -> condition",
}
TENSOR_DESCRIPTIONS = {
    "x_t": "noisy image (B, C, H, W), float32; t = 0 is pure noise, t = 1 data",
    "t": "time (B,) in [0, 1], float32",
    "y": "class label (B,), int32; num_classes is the null (unconditional) class",
    "hidden": "last DiT block output h (B, L, D), float32",
    "cond": "per-token condition SiLU(e_t + h) (B, L, D), float32",
    "v": "velocity x - noise (B, C, H, W), float32",
}
# Image-like inputs that carry the enumerated batch when only one input may.
PRIMARY_INPUT = {"dit": "x_t", "decoder": "x_t", "refresh": "hidden"}
# MIL operations that hold or unpack weights, or only move dtypes: not counted as compute.
_NON_COMPUTE = ("const", "cast")

Progress = Callable[[str], None]


class CoreMLExportError(DecoError, ValueError):
    """A model or setting Core ML cannot take; the message names the layer or the option."""


# ---------------------------------------------------------------------------------------------
# coremltools, imported lazily
# ---------------------------------------------------------------------------------------------


def import_coremltools() -> Any:
    """coremltools, quietly; a one-line error with the install command when it is missing."""
    try:
        with _quiet_logs():
            import coremltools
    except ImportError as err:
        raise ModuleNotFoundError(
            f"coremltools is not installed; install it with {INSTALL_HINT}",
            name="coremltools",
        ) from err
    return coremltools


def _quiet_logs() -> contextlib.AbstractContextManager[None]:
    """coremltools logs that its macOS-only proxies are missing on Linux and that it was not
    tested with this torch; both are expected here and drown the useful output."""
    return quiet("coremltools")


@contextlib.contextmanager
def _quiet_conversion(verbose: bool) -> Iterator[None]:
    """Silence coremltools' per-pass progress bars (conversion and compression) unless
    ``verbose``."""
    if verbose:
        yield
        return
    import importlib

    import tqdm

    patched = [("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
               ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
               ("coremltools.optimize.coreml._quantization_passes", "tqdm"),
               ("coremltools.optimize.coreml._post_training_quantization", "tqdm")]
    saved = []
    for module_name, attr in patched:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, partial(tqdm.tqdm, disable=True))
    try:
        with _quiet_logs():
            yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def deployment_target(ct: Any, name: str) -> Any:
    if name not in DEPLOYMENT_TARGETS:
        raise CoreMLExportError(
            f"unknown deployment target {name!r}; choose one of {', '.join(DEPLOYMENT_TARGETS)}"
        )
    return getattr(ct.target, name)


def joint_enumerated_shapes(ct: Any, target: Any) -> bool:
    """Whether several inputs may carry enumerated shapes (iOS 18 / macOS 15 and later)."""
    return target >= ct.target.iOS18


# ---------------------------------------------------------------------------------------------
# Precision policy: fp16 everywhere except the fp32 islands
# ---------------------------------------------------------------------------------------------


def parse_islands(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'all' / 'none' / 'rmsnorm,rope' / a sequence -> island names in canonical order."""
    if spec is None:
        return ALL_ISLANDS
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names in (["all"], []):
        return ALL_ISLANDS if names else ()
    if names == ["none"]:
        return ()
    unknown = sorted(set(names) - set(FP32_ISLANDS))
    if unknown:
        raise CoreMLExportError(
            f"unknown fp32 island(s) {unknown}; choose from {', '.join(FP32_ISLANDS)}, 'all' or "
            "'none'"
        )
    return tuple(n for n in ALL_ISLANDS if n in names)


def _module_scope(op: Any) -> tuple[list[str], str]:
    """(module class names from the outside in, torch op kind) recorded on a MIL operation."""
    from coremltools.converters.mil.mil.scope import ScopeSource

    scope = list(op.scopes.get(ScopeSource.TORCHSCRIPT_MODULE_TYPE, []) or [])
    if not scope:
        return [], ""
    return scope[:-1], scope[-1]


_ROPE_KINDS = ("mul", "sub", "add", "stack", "select")


def island_of(op: Any, _depth: int = 0) -> str | None:
    """The fp32 island a MIL operation belongs to, or None.

    * rmsnorm:   every operation inside an ``RMSNorm`` module (x^2, mean, +eps, rsqrt, scale);
    * layernorm: every operation inside an ``nn.LayerNorm``;
    * timestep:  the operations of ``TimestepEmbedder`` itself (t * freqs, cos, sin, concat),
                 not its MLP;
    * rope:      the arithmetic written directly in ``Attention.forward`` (the rotation is the
                 only arithmetic there; projections, norms and attention are their own modules
                 or ops), plus the reshapes that feed it from a norm or take its result.
    """
    modules, kind = _module_scope(op)
    if not modules:
        return None
    if "RMSNorm" in modules:
        return "rmsnorm"
    if "LayerNorm" in modules:
        return "layernorm"
    inner = modules[-1]
    if inner == "TimestepEmbedder":
        return "timestep"
    if inner == "Attention":
        if kind in _ROPE_KINDS:
            return "rope"
        if op.op_type == "reshape" and _depth == 0:
            source = op.inputs.get("x")
            producer = getattr(source, "op", None)
            if producer is not None and island_of(producer, _depth + 1) in ("rmsnorm", "rope"):
                return "rope"
    return None


@dataclass
class PrecisionPolicy:
    """The op selector handed to ``FP16ComputePrecision``: True casts an op to fp16."""

    islands: tuple[str, ...] = ALL_ISLANDS

    def __call__(self, op: Any) -> bool:
        island = island_of(op)
        return island is None or island not in self.islands


# ---------------------------------------------------------------------------------------------
# Structure of a converted program
# ---------------------------------------------------------------------------------------------


@dataclass
class ProgramReport:
    """Operation counts of an ML program by type and output precision, and its fp32 islands."""

    op_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    compute_ops: dict[str, int] = field(default_factory=dict)
    islands: dict[str, int] = field(default_factory=dict)
    unexpected_fp32: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"op_counts": self.op_counts, "compute_ops": self.compute_ops,
                "fp32_islands": self.islands, "unexpected_fp32": self.unexpected_fp32}


def _dtype_name(dtype: Any) -> str:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(dtype)
    except Exception:  # a type coremltools cannot name is "other"
        return "other"


def program_report(program: Any, islands: Sequence[str]) -> ProgramReport:
    """Count the operations of a MIL program (the in-memory result of a conversion).

    A compute operation is anything but const / cast / constexpr_* with a float output. In an
    fp16 program every fp32 compute operation must belong to one of ``islands``; the ones that
    do not are listed in ``unexpected_fp32`` with their module path.
    """
    counts: dict[str, Counter] = {}
    compute: Counter = Counter()
    found: Counter = Counter()
    unexpected: list[str] = []
    for function in program.functions.values():
        for op in function.operations:
            dtypes = sorted({_dtype_name(o.dtype) for o in op.outputs}) or ["none"]
            dtype = ",".join(dtypes)
            counts.setdefault(op.op_type, Counter())[dtype] += 1
            if op.op_type in _NON_COMPUTE or op.op_type.startswith("constexpr_"):
                continue
            if dtype not in ("fp16", "fp32"):
                continue
            compute[dtype] += 1
            if dtype == "fp32":
                island = island_of(op)
                if island is not None and island in islands:
                    found[island] += 1
                else:
                    modules, kind = _module_scope(op)
                    unexpected.append(f"{op.op_type} {op.name} ({'/'.join(modules) or 'top'}"
                                      f"{':' + kind if kind else ''})")
    return ProgramReport(
        op_counts={k: dict(sorted(v.items())) for k, v in sorted(counts.items())},
        compute_ops=dict(sorted(compute.items())),
        islands={name: found.get(name, 0) for name in islands},
        unexpected_fp32=unexpected,
    )


def inspect_package(path: str | Path) -> dict[str, Any]:
    """Structure of a saved ``.mlpackage``, read from its spec without loading the model.

    Works on Linux. Returns inputs (name, dtype, shape, enumerated shapes or ranges), outputs,
    operation counts by type and output dtype, the constexpr (compressed-weight) operations,
    the weight file size and the metadata.
    """
    ct = import_coremltools()
    from coremltools.proto import MIL_pb2

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    description = spec.description

    def feature(f: Any) -> dict[str, Any]:
        arr = f.type.multiArrayType
        d: dict[str, Any] = {
            "name": f.name,
            "dtype": ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(
                arr.dataType).lower(),
            "shape": list(arr.shape),
            "description": f.shortDescription,
        }
        if arr.HasField("enumeratedShapes"):
            d["enumerated"] = [list(s.shape) for s in arr.enumeratedShapes.shapes]
        if arr.HasField("shapeRange"):
            d["range"] = [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]
        return d

    counts: dict[str, Counter] = {}
    for function in spec.mlProgram.functions.values():
        block = function.block_specializations[function.opset]
        for op in block.operations:
            dtypes = sorted({MIL_pb2.DataType.Name(o.type.tensorType.dataType).lower()
                             for o in op.outputs}) or ["none"]
            counts.setdefault(op.type, Counter())[",".join(dtypes)] += 1
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    weight_bytes = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file()) \
        if weights.is_dir() else 0
    meta = description.metadata
    return {
        "specification_version": spec.specificationVersion,
        "inputs": [feature(f) for f in description.input],
        "outputs": [feature(f) for f in description.output],
        "op_counts": {k: dict(sorted(v.items())) for k, v in sorted(counts.items())},
        "constexpr_ops": {k: sum(v.values()) for k, v in sorted(counts.items())
                          if k.startswith("constexpr_")},
        "weight_bytes": weight_bytes,
        "metadata": {
            "author": meta.author, "license": meta.license, "version": meta.versionString,
            "short_description": meta.shortDescription, "user": dict(meta.userDefined),
        },
    }


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


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


def input_types(ct: Any, graph: str, inputs: Sequence[torch.Tensor],
                batch_sizes: Sequence[int], target: Any) -> list[Any]:
    """Core ML input types with the batch enumerated (see the module docstring)."""
    joint = joint_enumerated_shapes(ct, target)
    sizes = sorted(set(batch_sizes))
    types = []
    for name, x in zip(INPUT_NAMES[graph], inputs, strict=True):
        rest = tuple(int(s) for s in x.shape[1:])
        dtype = np.int32 if not torch.is_floating_point(x) else np.float32
        if len(sizes) == 1:
            shape: Any = (sizes[0], *rest)
        elif joint or name == PRIMARY_INPUT[graph]:
            shape = ct.EnumeratedShapes(shapes=[(b, *rest) for b in sizes],
                                        default=(sizes[0], *rest))
        else:
            shape = ct.Shape((ct.RangeDim(lower_bound=sizes[0], upper_bound=sizes[-1],
                                          default=sizes[0]), *rest))
        types.append(ct.TensorType(name=name, shape=shape, dtype=dtype))
    return types


def convert_graph(module: torch.nn.Module, graph: str, inputs: Sequence[torch.Tensor], *,
                  precision: str = "fp16", target: str = DEFAULT_TARGET,
                  batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                  islands: Sequence[str] = ALL_ISLANDS,
                  compute_units: str = DEFAULT_COMPUTE_UNITS,
                  verbose: bool = False) -> tuple[Any, ProgramReport]:
    """Trace and convert one graph wrapper; returns the MLModel (not loaded) and its report.

    ``module`` is a float32 graph wrapper (``graph_modules(model, "fp32")[graph]``); the
    precision is applied by coremltools. An fp16 conversion that leaves an fp32 operation
    outside ``islands`` is refused, naming it.
    """
    ct = import_coremltools()
    if precision not in PRECISIONS:
        raise CoreMLExportError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    ml_target = deployment_target(ct, target)
    units = compute_unit(ct, compute_units)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), tuple(inputs), check_trace=False)
    check_ranks(traced, graph)
    if precision == "fp16":
        compute_precision = ct.transform.FP16ComputePrecision(
            op_selector=PrecisionPolicy(tuple(islands)))
    else:
        compute_precision = ct.precision.FLOAT32
    with _quiet_conversion(verbose):
        try:
            mlmodel = ct.convert(
                traced,
                inputs=input_types(ct, graph, inputs, batch_sizes, ml_target),
                outputs=[ct.TensorType(name=name, dtype=np.float32)
                         for name in OUTPUT_NAMES[graph]],
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
        shown = "; ".join(report.unexpected_fp32[:5])
        more = len(report.unexpected_fp32) - 5
        raise CoreMLExportError(
            f"fp16 {graph} graph: {len(report.unexpected_fp32)} operation(s) stayed fp32 outside "
            f"the chosen islands ({shown}{f'; and {more} more' if more > 0 else ''}); "
            "coremltools keeps an op fp32 when a constant exceeds the fp16 range"
        )
    return mlmodel, report


def compute_unit(ct: Any, name: str) -> Any:
    if name not in COMPUTE_UNITS:
        raise CoreMLExportError(
            f"unknown compute units {name!r}; choose one of {', '.join(COMPUTE_UNITS)}"
        )
    return getattr(ct.ComputeUnit, name)


# ---------------------------------------------------------------------------------------------
# Compression
# ---------------------------------------------------------------------------------------------


def _lloyd(v: np.ndarray, w: np.ndarray, centroids: np.ndarray, iterations: int
           ) -> tuple[np.ndarray, float]:
    """Weighted 1-D Lloyd iterations; returns the centroids and their weighted squared error.
    In one dimension the assignment is a search against the centroid midpoints."""
    k = len(centroids)
    tolerance = 1e-9 * float(v[-1] - v[0] or 1.0)
    for _ in range(iterations):
        assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, v)
        mass = np.bincount(assign, weights=w, minlength=k)
        sums = np.bincount(assign, weights=v * w, minlength=k)
        updated = np.sort(np.where(mass > 0, sums / np.maximum(mass, 1e-300), centroids))
        moved = float(np.max(np.abs(updated - centroids)))
        centroids = updated
        if moved <= tolerance:
            break
    assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, v)
    return centroids, float(np.sum(w * (v - centroids[assign]) ** 2))


def kmeans_lut(weight: np.ndarray, nbits: int, iterations: int = 100
               ) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means look-up table (2**nbits entries) and per-weight indices.

    The weights are binned into a 4,096-bin histogram and Lloyd's algorithm runs on the bins,
    so a 3-million-weight tensor takes a fraction of a second without scikit-learn. Lloyd
    only improves on its start and moves slowly in one dimension, so it starts from the
    asymptotically optimal point density for squared error (quantiles of p(x)^(1/3), which
    lands next to the Lloyd-Max optimum at once) and from a uniform grid (so the result is
    never worse than uniform quantisation), and keeps the better. Every weight is then
    assigned exactly to its nearest stored entry; tensors with at most 2**nbits distinct
    values are stored exactly.
    """
    k = 1 << nbits
    flat = weight.reshape(-1)
    x = flat.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    hist, edges = np.histogram(x, bins=HISTOGRAM_BINS, range=(lo, hi) if hi > lo else None)
    if np.count_nonzero(hist) <= k:
        values, inverse = np.unique(flat, return_inverse=True)
        if len(values) <= k:
            lut = np.zeros(k, dtype=weight.dtype)
            lut[: len(values)] = values
            return lut, inverse.reshape(-1).astype(np.uint8)
    centers = (edges[:-1] + edges[1:]) / 2
    keep = hist > 0
    v, w = centers[keep], hist[keep].astype(np.float64)
    density = np.cumsum(hist.astype(np.float64) ** (1.0 / 3.0))
    quantiles = (np.arange(k) + 0.5) / k
    starts = (np.interp(quantiles, density / density[-1], centers), np.linspace(lo, hi, k))
    centroids, _ = min((_lloyd(v, w, c, iterations) for c in starts), key=lambda r: r[1])
    lut = centroids.astype(weight.dtype)
    stored = lut.astype(np.float64)
    indices = np.searchsorted((stored[1:] + stored[:-1]) / 2, x)
    return lut, indices.astype(np.uint8)


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# Ops whose constant inputs are learned weights. Other large constants (the RoPE cos/sin tables,
# the decoder's folded DCT position term) are exact functions of the geometry and stay as they
# are: quantising RoPE's tables would undo its fp32 island.
WEIGHT_CONSUMERS = ("linear", "matmul", "conv", "gather", "embedding")


def constant_tensors(spec: Any) -> list[tuple[str, tuple[int, ...], bool, set[str]]]:
    """(op name, shape, is float, consumer op types) of every constant of an ML program spec.

    Read from the protobuf, so no weight is loaded (coremltools' ``get_weights_metadata``
    loads every weight and sorts it to count distinct values: minutes on a large DiT).
    """
    from coremltools.proto import MIL_pb2

    found = []
    for function in spec.mlProgram.functions.values():
        operations = function.block_specializations[function.opset].operations
        consumers: dict[str, set[str]] = {}
        for op in operations:
            for argument in op.inputs.values():
                for binding in argument.arguments:
                    if binding.WhichOneof("binding") == "name":
                        consumers.setdefault(binding.name, set()).add(op.type)
        for op in operations:
            if op.type != "const" or "val" not in op.attributes:
                continue
            ttype = op.attributes["val"].type.tensorType
            shape = tuple(int(d.constant.size) for d in ttype.dimensions)
            is_float = MIL_pb2.DataType.Name(ttype.dataType) in ("FLOAT16", "FLOAT32")
            name = op.attributes["name"].immediateValue.tensor.strings.values[0]
            found.append((name, shape, is_float, consumers.get(op.outputs[0].name, set())))
    return found


def compression_config(ct: Any, mlmodel: Any, compression: str, target: Any
                       ) -> tuple[Any, dict[str, Any]]:
    """coremltools OptimizationConfig for a compression name, and what to record about it.

    Only learned weights are compressed (see `WEIGHT_CONSUMERS`). Grouped palettes need the
    group to divide the output channels; DeCo's SwiGLU width (int(8D/3), e.g. 2730) and the
    label table (num_classes + 1 rows) rarely divide by 16, so those tensors get the largest
    divisor <= 16 as their group size instead of being skipped.
    """
    from coremltools.optimize import coreml as cto

    if compression not in COMPRESSIONS or compression == "none":
        raise CoreMLExportError(
            f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS[1:])}"
        )
    record: dict[str, Any] = {"weight_threshold": WEIGHT_THRESHOLD}
    if compression == "int8":
        record.update(method="linear_quantize_weights", nbits=8, mode="linear_symmetric",
                      granularity="per_channel")

        def make(_rows: int) -> Any:
            return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                               granularity="per_channel",
                                               weight_threshold=WEIGHT_THRESHOLD)
        grouped = False
    else:
        nbits = int(compression[-1])
        lut = partial(kmeans_lut, nbits=nbits)
        grouped = joint_enumerated_shapes(ct, target)  # grouped palettes need iOS 18 / macOS 15
        record.update(method="palettize_weights", nbits=nbits, mode="kmeans (1-D, Lloyd)",
                      granularity="per_grouped_channel" if grouped else "per_tensor")

        def make(rows: int) -> Any:
            if not grouped:
                return cto.OpPalettizerConfig(mode="custom", lut_function=lut,
                                              granularity="per_tensor",
                                              weight_threshold=WEIGHT_THRESHOLD)
            return cto.OpPalettizerConfig(
                mode="custom", lut_function=lut, granularity="per_grouped_channel",
                group_size=largest_divisor(rows, PALETTE_GROUP_SIZE), channel_axis=0,
                weight_threshold=WEIGHT_THRESHOLD)

    by_name: dict[str, Any] = {}
    compressed = kept = smaller = 0
    for name, shape, is_float, consumers in constant_tensors(mlmodel.get_spec()):
        if math.prod(shape) <= WEIGHT_THRESHOLD:
            continue
        if len(shape) < 2 or not is_float or not consumers or \
                not consumers <= set(WEIGHT_CONSUMERS):
            by_name[name] = None
            kept += 1
            continue
        compressed += 1
        if grouped and shape[0] % PALETTE_GROUP_SIZE:
            smaller += 1
        by_name[name] = make(int(shape[0]))
    record.update(compressed_tensors=compressed, uncompressed_constants=kept)
    if grouped:
        record.update(group_size=PALETTE_GROUP_SIZE, smaller_groups=smaller)
    return cto.OptimizationConfig(global_config=None, op_name_configs=by_name), record


def compress_model(mlmodel: Any, compression: str, target: str = DEFAULT_TARGET,
                   verbose: bool = False) -> tuple[Any, dict[str, Any]]:
    """Compress an ML program's weights; returns the new model and a record of what was done.

    Tensors of at most ``WEIGHT_THRESHOLD`` elements (norm weights, biases) keep their
    precision; every larger weight becomes a constexpr operation that decompresses at load.
    """
    if compression in (None, "none"):
        return mlmodel, {"method": "none"}
    ct = import_coremltools()
    from coremltools.optimize import coreml as cto

    config, record = compression_config(ct, mlmodel, compression, deployment_target(ct, target))
    started = time.perf_counter()
    with _quiet_conversion(verbose):
        if compression == "int8":
            compressed = cto.linear_quantize_weights(mlmodel, config=config)
        else:
            compressed = cto.palettize_weights(mlmodel, config=config)
    record["seconds"] = round(time.perf_counter() - started, 2)
    return compressed, record


def compress_package(source: str | Path, destination: str | Path, compression: str,
                     target: str | None = None) -> dict[str, Any]:
    """Compress the weights of a saved package into a new one, without converting again.

    ``target`` defaults to the deployment target recorded in the package's metadata, else the
    one its specification version implies (grouped palettes need iOS 18 / macOS 15). Metadata
    and descriptions are kept; ``deco.compression`` is updated. Returns the compression record.
    """
    ct = import_coremltools()
    with _quiet_logs():
        mlmodel = ct.models.MLModel(str(source), skip_model_load=True)
    version = mlmodel.get_spec().specificationVersion
    implied = next((n for n in DEPLOYMENT_TARGETS if getattr(ct.target, n) == version),
                   DEFAULT_TARGET)
    target = target or mlmodel.user_defined_metadata.get("deco.deployment_target", implied)
    compressed, record = compress_model(mlmodel, compression, target)
    compressed.user_defined_metadata["deco.compression"] = compression
    with _quiet_logs():
        compressed.save(str(destination))
    return record


# ---------------------------------------------------------------------------------------------
# Metadata and files
# ---------------------------------------------------------------------------------------------


def coreml_file_name(graph: str, precision: str) -> str:
    """``dit.mlpackage`` for fp32 and ``dit.fp16.mlpackage`` for fp16, as the ONNX names."""
    return f"{graph}.mlpackage" if precision == "fp32" else f"{graph}.{precision}.mlpackage"


def describe_model(mlmodel: Any, model: DeCo, graph: str, precision: str, *,
                   image_size: tuple[int, int], batch_sizes: Sequence[int], target: str,
                   compute_units: str, compression: str, islands: Sequence[str],
                   license: str, source: dict[str, Any] | None) -> None:
    """Write the model metadata Xcode and ``MLModel.get_spec()`` show: author, licence,
    version, descriptions of every input and output, and the DeCo config as JSON."""
    from .. import __version__

    mlmodel.author = f"deco-export {__version__}"
    mlmodel.license = license
    mlmodel.version = __version__
    mlmodel.short_description = GRAPH_DESCRIPTIONS[graph]
    for name in INPUT_NAMES[graph]:
        mlmodel.input_description[name] = TENSOR_DESCRIPTIONS[name]
    for name in OUTPUT_NAMES[graph]:
        mlmodel.output_description[name] = TENSOR_DESCRIPTIONS[name]
    user = {
        "deco.graph": graph,
        "deco.precision": precision,
        "deco.config": json.dumps(model.config.to_dict() | {"image_size": list(image_size)},
                                  sort_keys=True),
        "deco.image_size": f"{image_size[0]}x{image_size[1]}",
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


def can_predict() -> bool:
    """Core ML runs models only on macOS."""
    return sys.platform == "darwin"


NOT_RUN_REASON = (
    "Core ML predicts only on macOS; this export ran on {platform}, so only its structure was "
    "checked. Re-export on a Mac to record parity"
)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


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
    *,
    precisions: Sequence[str] = ("fp16",),
    image_size: tuple[int, int] | None = None,
    source: dict | None = None,
    target: str = DEFAULT_TARGET,
    batch_sizes: Sequence[int] = (),
    compute_units: str = DEFAULT_COMPUTE_UNITS,
    compression: str = "none",
    fp32_islands: str | Sequence[str] | None = None,
    license: str | None = None,
    parity_steps: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
    verbose: bool = False,
    force: bool = False,
) -> Path:
    """Export ``model`` as Core ML packages into ``bundle`` (created or extended); its path.

    ``batch_sizes`` are added to (1, 2). ``compute_units`` is recorded for the runtime (the
    package runs on any). ``compression`` is "none", "int8", "palette6" or "palette4".
    ``fp32_islands`` picks what stays fp32 in fp16 packages ("all", "none" or names from
    `FP32_ISLANDS`; "none" suits CPU_AND_NE, where fp32 work leaves the Neural Engine).
    """
    say = progress or (lambda _msg: None)
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
    licence = license or (source or {}).get("license") or DEFAULT_LICENSE
    modules = graph_modules(model, "fp32")
    trace_inputs = tracing_inputs(model, height, width, seed)
    with bundle_io.BundleTransaction(bundle, model.config, (height, width), source,
                                     force=force) as txn:
        for precision in precisions:
            parity: list[GraphParity] = []
            for graph in GRAPH_NAMES:
                name = coreml_file_name(graph, precision)
                say(f"converting {name} ({target}, batch {','.join(map(str, sizes))}"
                    f"{', ' + compression if compression != 'none' else ''})")
                started = time.perf_counter()
                mlmodel, report = convert_graph(
                    modules[graph], graph, trace_inputs[graph], precision=precision, target=target,
                    batch_sizes=sizes, islands=islands, compute_units=compute_units,
                    verbose=verbose)
                convert_seconds = time.perf_counter() - started
                mlmodel, compression_record = compress_model(mlmodel, compression, target,
                                                              verbose=verbose)
                describe_model(mlmodel, model, graph, precision, image_size=(height, width),
                               batch_sizes=sizes, target=target, compute_units=compute_units,
                               compression=compression, islands=islands, license=licence,
                               source=source)
                path = txn.staging / name
                with _quiet_logs():
                    mlmodel.save(str(path))
                structure = inspect_package(path)
                details = {
                    "format": "mlprogram",
                    "converter": "coremltools (torch.jit.trace)",
                    "deployment_target": target,
                    "specification_version": structure["specification_version"],
                    "compute_units": compute_units,
                    "batch_sizes": list(sizes),
                    "batch_shapes": batch_shape_kinds(ct, graph, target, sizes),
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
                    results = graph_parity(model, graph, path, height, width, seed,
                                           compute_units)
                    parity += results
                    graph_figures = {"graphs": [r.to_dict() for r in results]}
                else:
                    graph_figures = {"status": "not run",
                                     "reason": NOT_RUN_REASON.format(platform=sys.platform)}
                inputs_spec, outputs_spec = coreml_io_specs(model, graph, height, width)
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
                end_to_end(txn, model, precision, compression, parity, parity_steps, seed,
                           compute_units, sizes, say)
            else:
                txn.record_end_to_end("coreml", precision, {
                    "status": "not run", "reason": NOT_RUN_REASON.format(platform=sys.platform)})
    return Path(bundle)


def tracing_inputs(model: DeCo, height: int, width: int, seed: int
                   ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Batch-2 inputs of every graph from one DiT forward (``example_inputs`` runs the DiT once
    per graph, which costs more than converting the small graphs of a large model)."""
    x_t, t, y = example_inputs(model, "dit", 2, height, width, seed=seed)
    with torch.no_grad():
        cond, hidden = model.dit(x_t, t, y)
    return {"dit": (x_t, t, y), "decoder": (x_t, cond), "refresh": (hidden, t)}


def batch_shape_kinds(ct: Any, graph: str, target: str, sizes: Sequence[int]) -> dict[str, str]:
    """How each input's batch is declared: "enumerated", "range" or "fixed"."""
    if len(sizes) == 1:
        return {name: "fixed" for name in INPUT_NAMES[graph]}
    joint = joint_enumerated_shapes(ct, deployment_target(ct, target))
    return {name: "enumerated" if joint or name == PRIMARY_INPUT[graph] else "range"
            for name in INPUT_NAMES[graph]}


def coreml_io_specs(model: DeCo, graph: str, height: int, width: int
                    ) -> tuple[list[dict], list[dict]]:
    """The shared I/O specs with Core ML's int32 labels."""
    inputs, outputs = io_specs(model.config, graph, height, width)
    ins = [dict(s.to_dict(), dtype="int32" if s.dtype == "int64" else s.dtype) for s in inputs]
    return ins, [s.to_dict() for s in outputs]


def graph_parity(model: DeCo, graph: str, path: Path, height: int, width: int, seed: int,
                 compute_units: str = DEFAULT_COMPUTE_UNITS) -> list[GraphParity]:
    """Each output of a Core ML package against PyTorch eager fp32 (macOS only)."""
    ct = import_coremltools()
    mlmodel = ct.models.MLModel(str(path), compute_units=compute_unit(ct, compute_units))
    results = []
    for batch in PARITY_BATCHES:
        inputs = example_inputs(model, graph, batch, height, width, seed=seed + batch)
        expected = reference_outputs(model, graph, inputs)
        feeds = {name: x.numpy().astype(np.int32 if not torch.is_floating_point(x)
                                        else np.float32)
                 for name, x in zip(INPUT_NAMES[graph], inputs, strict=True)}
        got = mlmodel.predict(feeds)
        for name, ref in zip(OUTPUT_NAMES[graph], expected, strict=True):
            label = graph if len(expected) == 1 else f"{graph}.{name}"
            ref_np, out = ref.numpy(), np.asarray(got[name], dtype=np.float32)
            results.append(GraphParity(label, batch, max_abs_error(ref_np, out),
                                       psnr(ref_np, out)))
    return results


def end_to_end(txn: bundle_io.BundleTransaction, model: DeCo, precision: str, compression: str,
               parity: list[GraphParity], steps: int, seed: int, compute_units: str,
               batch_sizes: Sequence[int], say: Progress) -> None:
    """Gate one precision's packages (macOS): per graph, then the sampler end to end.

    Uncompressed packages take the ONNX gates for their precision. Compressed weights change
    the function itself, so their graph errors are reported, not gated, and their images must
    reach the fp16 end-to-end gate whatever the compute precision.
    """
    what = f"Core ML {precision} export"
    if compression == "none":
        check_graph_gate(precision, parity, what=what)
        say(f"sampling end to end through Core ML ({precision}, {steps} steps)")
        figures = txn.end_to_end_parity(model, "coreml", precision, steps, seed,
                                        compute_units=compute_units)
    else:
        from runtimes import DeCoPipeline
        from runtimes.backends.coreml import CoreMLBackend

        say(f"sampling end to end through Core ML ({precision}, {compression}, {steps} steps)")
        paths = {a.graph: txn.staging / a.file for a in txn.artifacts
                 if (a.runtime, a.precision) == ("coreml", precision)}
        backend = CoreMLBackend.from_packages(paths, compute_units=compute_units,
                                              batch_sizes=batch_sizes)
        pipe = DeCoPipeline(backend, model.config,
                            bundle_io.default_sampler_settings(model.config))
        (height, width) = txn.image_size
        figures = bundle_io.end_to_end_figures(model, pipe, (height, width), steps, seed)
        threshold = END_TO_END_MIN_PSNR["fp16"]
        check_end_to_end_gate("fp16", figures["psnr_db"], what=f"{what} ({compression})")
        txn.record_end_to_end("coreml", precision, {
            **figures, "psnr_db": finite(figures["psnr_db"]), "threshold_db": threshold,
            "compression": compression})
    worst = max((r.max_abs_error for r in parity), default=math.nan)
    say(f"Core ML {precision}: worst graph error {worst:.2e}, end to end "
        f"{figures['psnr_db']:.1f} dB")


# ---------------------------------------------------------------------------------------------
# Model source: a checkpoint, or a bundle whose manifest names its checkpoint
# ---------------------------------------------------------------------------------------------


def load_source(spec: str, weights: str = "ema", checkpoint: str | None = None
                ) -> tuple[DeCo, dict[str, Any], tuple[int, int] | None]:
    """(model, source record, image size) from a checkpoint or from an exported bundle.

    A bundle does not hold PyTorch weights: its manifest names the checkpoint it was exported
    from (with its sha256), which is loaded and checked against the bundle's model; pass
    ``checkpoint`` when that path is not valid on this machine.
    """
    from runtimes import bundle as rb

    from ..sources import is_bundle, load_model

    if not is_bundle(spec):
        model, source = load_model(checkpoint or spec, weights=weights)
        return model, source, None
    manifest = rb.read_manifest(spec)
    recorded = dict(manifest.source or {})
    path = checkpoint or recorded.get("path")
    if not path:
        raise CoreMLExportError(
            f"{spec} does not name the checkpoint it was exported from; pass --checkpoint PATH"
        )
    model, source = load_model(path, weights=recorded.get("weights", weights))
    if checkpoint is None and recorded.get("sha256") and source.get("sha256") != \
            recorded["sha256"]:
        raise CoreMLExportError(
            f"the checkpoint at {path} is not the one {spec} was exported from (sha256 "
            "differs); pass the original with --checkpoint"
        )
    have = model.config.to_dict()
    want = manifest.model.to_dict()
    if {k: v for k, v in have.items() if k != "image_size"} != \
            {k: v for k, v in want.items() if k in have and k != "image_size"}:
        raise CoreMLExportError(f"{path} is a different model from the one in {spec}")
    size = want.get("image_size")
    return model, source, (int(size[0]), int(size[1])) if size else None


__all__ = [
    "COMPRESSIONS",
    "COMPUTE_UNITS",
    "DEPLOYMENT_TARGETS",
    "FP32_ISLANDS",
    "CoreMLExportError",
    "PrecisionPolicy",
    "ProgramReport",
    "check_ranks",
    "compress_model",
    "compress_package",
    "convert_graph",
    "coreml_file_name",
    "export_coreml",
    "import_coremltools",
    "inspect_package",
    "island_of",
    "kmeans_lut",
    "load_source",
    "parse_islands",
    "program_report",
    "unsupported_ops",
]
