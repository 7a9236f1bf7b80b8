"""Weight compression of a converted program: 8-bit linear, or 6- and 4-bit palettes from a
1-D k-means that needs no scikit-learn. Only learned weights are compressed."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .convert import discard_temp_packages
from .targets import (
    COMPRESSIONS,
    DEFAULT_TARGET,
    DEPLOYMENT_TARGETS,
    CoreMLExportError,
    deployment_target,
    import_coremltools,
    joint_enumerated_shapes,
    quiet_conversion,
    quiet_logs,
)

WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller tensors (norm weights, biases) stay
PALETTE_GROUP_SIZE = 16
HISTOGRAM_BINS = 4096  # palettes are clustered on a histogram this fine


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
    with quiet_conversion(verbose):
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
    with quiet_logs():
        mlmodel = ct.models.MLModel(str(source), skip_model_load=True)
    version = mlmodel.get_spec().specificationVersion
    implied = next((n for n in DEPLOYMENT_TARGETS if getattr(ct.target, n) == version),
                   DEFAULT_TARGET)
    target = target or mlmodel.user_defined_metadata.get("deco.deployment_target", implied)
    compressed, record = compress_model(mlmodel, compression, target)
    try:
        compressed.user_defined_metadata["deco.compression"] = compression
        with quiet_logs():
            compressed.save(str(destination))
    finally:
        discard_temp_packages(mlmodel, compressed)
    return record
