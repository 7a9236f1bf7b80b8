"""Precision policy of an fp16 export: fp16 everywhere except the fp32 islands, found
through the TorchScript module scopes coremltools keeps on every MIL operation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .targets import CoreMLExportError

#: fp32 islands of an fp16 export, by name: what stays fp32 and why.
FP32_ISLANDS: dict[str, str] = {
    "rmsnorm": "RMSNorm x^2, mean, rsqrt and scale: x^2 overflows fp16 above |x| = 256",
    "layernorm": "the pixel decoder's LayerNorm (mean and variance over 32 channels)",
    "rope": "the RoPE rotation of q and k, computed in fp32 by the reference",
    "timestep": "the sinusoidal timestep features (t in [0, 1] needs more than fp16's 11 bits)",
}
ALL_ISLANDS = tuple(FP32_ISLANDS)


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


def module_scope(op: Any) -> tuple[list[str], str]:
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
    modules, kind = module_scope(op)
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
