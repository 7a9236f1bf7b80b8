"""The structure of a Core ML program: operation counts by precision, fp32 islands, and a
saved package's inputs, shapes, weights and metadata (read from its spec, so on Linux too)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .precision import island_of, module_scope
from .targets import import_coremltools

# MIL operations that hold or unpack weights, or only move dtypes: not counted as compute.
_NON_COMPUTE = ("const", "cast")


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
                    modules, kind = module_scope(op)
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
