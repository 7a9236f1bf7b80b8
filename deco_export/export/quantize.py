"""int8 graphs: ONNX Runtime's dynamic quantization, with settings that hold on every x86 CPU.

An int8 graph is the fp32 graph with its MatMul/Gemm weights stored as int8 and each
activation quantized to uint8 per call from its own range (``DynamicQuantizeLinear`` +
``MatMulInteger``); no calibration data is needed.

Why the weights are 7-bit by default (``reduce_range``): ONNX Runtime multiplies uint8
activations by int8 weights with different kernels per CPU. With VNNI (``vpdpbusd``; AVX-512
VNNI, AVX-VNNI, AMX) four products are summed straight into int32, exactly. Without it (AVX2
only: Intel before Ice Lake, AMD before Zen 4) the kernel uses ``vpmaddubsw``, which adds two
u8 x s8 products into a *saturating int16*: 2 x 255 x 127 = 64,770 overflows 32,767, and an
image that passes the gate on a VNNI CPU can fall tens of dB on an AVX2 one. With weights in
[-64, 64] the pair is at most 2 x 255 x 64 = 32,640, so both kernels compute the same exact
integer products: what the gate measures on one kind of CPU holds on the other (ONNX
Runtime's quantization guide recommends this setting for CPUs without VNNI). It costs one bit
of weight precision; docs/benchmarks.md has the measurement behind the default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from runtimes.errors import ConfigError

from .graphs import quiet

__all__ = ["INT8_WEIGHTS", "WEIGHT_TYPES", "Int8Settings", "quantize_int8"]

WEIGHT_TYPES = ("int8", "uint8")
QUANTIZABLE_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Settings:
    """How `quantize_int8` quantizes a graph; recorded in the manifest with each int8 graph.

    ``weight_type``: "int8" (u8 x s8 products, the fast kernels) or "uint8" (u8 x u8).
    ``reduce_range``: 7-bit weights, exact on AVX2's saturating kernel (see the module doc).
    ``per_channel``: one weight scale per output channel rather than per tensor.
    ``ops``: the op types quantized (MatMuls with a constant weight; attention's
    activation-by-activation products stay float).
    """

    weight_type: str = "int8"
    reduce_range: bool = True
    per_channel: bool = True
    ops: tuple[str, ...] = QUANTIZABLE_OPS

    def __post_init__(self) -> None:
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f"int8 weight type {self.weight_type!r} is not one of "
                              f"{', '.join(WEIGHT_TYPES)}")
        unknown = [op for op in self.ops if op not in QUANTIZABLE_OPS]
        if unknown or not self.ops:
            raise ConfigError(f"int8 ops {list(self.ops)}: choose from "
                              f"{', '.join(QUANTIZABLE_OPS)}")

    @property
    def saturation_free(self) -> bool:
        """True when every CPU kernel computes the same exact integer products (see module
        doc): u8 x u8 never uses the saturating u8 x s8 instruction, 7-bit s8 cannot
        saturate it."""
        return self.weight_type == "uint8" or self.reduce_range

    def describe(self) -> str:
        bits = "7-bit" if self.reduce_range else "8-bit"
        scale = "per channel" if self.per_channel else "per tensor"
        ops = "/".join(self.ops)
        return f"{bits} {self.weight_type} weights {scale}, uint8 activations ({ops})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ops": list(self.ops)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Int8Settings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown int8 settings {unknown}; known: {sorted(known)}")
        values = dict(data)
        if "ops" in values:
            values["ops"] = tuple(values["ops"])
        return cls(**values)


# `deco export onnx --int8-weights NAME`: the settings measured in docs/benchmarks.md.
INT8_WEIGHTS = {
    "int8-7bit": Int8Settings(),  # exact on every x86 kernel: the default
    "int8": Int8Settings(reduce_range=False),  # 8-bit: saturates on AVX2-only CPUs
    "uint8": Int8Settings(weight_type="uint8", reduce_range=False),  # u8 x u8 kernels
}


def quantize_int8(path: Path, external_data: bool,
                  settings: Int8Settings | None = None) -> dict[str, Any]:
    """Replace the fp32 graph at ``path`` by its dynamically quantized int8 version and return
    the record the manifest keeps (the settings and how many MatMuls became integer ones).

    The quantizer re-infers shapes; the dynamo exporter's value_info (symbolic batch) trips it,
    so it is dropped first (ONNX Runtime re-derives what it needs at load).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = settings or Int8Settings()
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    for stale in [path, *path.parent.glob(path.name + ".data")]:
        stale.unlink()
    weight_type = QuantType.QInt8 if settings.weight_type == "int8" else QuantType.QUInt8
    with quiet(""):  # the quantizer suggests its pre-processing pass on the root logger
        quantize_dynamic(model, path, op_types_to_quantize=list(settings.ops),
                         per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                         weight_type=weight_type, use_external_data_format=external_data)
    quantized = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in quantized.graph.node]
    return {"method": "onnxruntime.quantization.quantize_dynamic",
            "settings": settings.to_dict(), "saturation_free": settings.saturation_free,
            "weights": ("7-bit " if settings.reduce_range else "") + settings.weight_type +
                       (" per channel" if settings.per_channel else " per tensor"),
            "activations": "uint8 per tensor, dynamic", "ops": list(settings.ops),
            "quantized_matmuls": ops.count("MatMulInteger"),
            "float_matmuls": ops.count("MatMul") + ops.count("Gemm")}
