"""The model's configuration: one frozen record shared by the runtime, the exporters and training.

It holds only what changes the weights' shapes or the forward pass; sampling settings live in
the sampler. Pure Python (no torch, no numpy), so an application reading a bundle needs nothing
else. It round-trips through JSON (a checkpoint's ``config.json``, a bundle manifest's
``"model"``); fields added after the first release (``family``, ``architecture``, ``text_*``,
``refine_depth``, ``guidance_distilled``) are left out while they hold their defaults, so
class-conditional files stay byte-identical to those older releases wrote and read.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["ARCHITECTURES", "FAMILIES", "ModelConfig"]

FAMILIES = ("c2i", "t2i")  # class labels / text embeddings as the condition
ARCHITECTURES = ("deco", "dit")  # DiT + pixel decoder / plain pixel DiT (one graph)

# Smallest value of each integer field. Zero is allowed where a family or architecture does not
# use the field (no decoder in "dit", no text in "c2i", no classes in "t2i").
_MINIMUM = {
    "hidden_size": 1, "num_heads": 1, "dit_depth": 1, "decoder_hidden_size": 0,
    "decoder_depth": 0, "patch_size": 1, "num_classes": 0, "in_channels": 1,
    "text_len": 0, "text_dim": 0, "refine_depth": 0,
}
# Fields serialised only when they differ from their default.
_OPTIONAL = ("family", "text_len", "text_dim", "refine_depth", "architecture",
             "guidance_distilled")
_TEXT_FIELDS = ("text_len", "text_dim", "refine_depth")


def _integer_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid integer for field ``key``, or None."""
    low = _MINIMUM[key]
    kind = "a positive integer" if low == 1 else "a positive integer or 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        return f"{key} must be {kind}, got {value!r}"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a DeCo model (the reference's ``PixNerDiT``).

    ``family`` says what conditions the model: "c2i" (``num_classes`` labels plus a null label
    for guidance) or "t2i" (``text_len`` x ``text_dim`` text embeddings, refined by
    ``refine_depth`` blocks). ``architecture`` is "deco" (a DiT then the pixel decoder) or "dit"
    (the plain pixel DiT baseline: ``dit_depth`` blocks and a final layer, no decoder).
    ``image_size`` is the native (height, width) the model was trained at; the model runs at any
    multiple of ``patch_size`` because its RoPE positions are normalised.
    ``guidance_distilled`` marks a model that takes the guidance scale w as an input (a
    guidance embedding added to the time embedding of its blocks) and gives the guided
    velocity in one conditional pass: its DiT graph has a ``guidance`` input and the sampler
    runs no unconditional half.
    """

    hidden_size: int = 1152
    num_heads: int = 16
    dit_depth: int = 28
    decoder_hidden_size: int = 32
    decoder_depth: int = 3
    patch_size: int = 16
    num_classes: int = 1000
    in_channels: int = 3
    # No module reads the native size (RoPE positions are normalised), so a traced graph does
    # not depend on it: the trace cache leaves it out of its key.
    image_size: tuple[int, int] = dataclasses.field(default=(256, 256),
                                                    metadata={"shapes_graph": False})
    family: str = "c2i"
    text_len: int = 0
    text_dim: int = 0
    refine_depth: int = 0
    architecture: str = "deco"
    guidance_distilled: bool = False

    def __post_init__(self) -> None:
        size: Any = self.image_size  # any value a caller passed, checked here
        if (isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2
                or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1
                       for s in size)):
            raise ConfigError(f"image_size must be [height, width] in pixels, got {size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        for key in _MINIMUM:
            problem = _integer_problem(key, getattr(self, key))
            if problem:
                raise ConfigError(problem)
            object.__setattr__(self, key, int(getattr(self, key)))
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; choose one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        if not isinstance(self.guidance_distilled, bool):
            raise ConfigError(
                f"guidance_distilled must be true or false, got {self.guidance_distilled!r}")
        if self.guidance_distilled and self.architecture != "deco":
            raise ConfigError("guidance_distilled needs architecture 'deco' (the plain DiT "
                              "baseline has no guidance embedding)")
        if self.architecture == "dit" and self.family != "c2i":
            raise ConfigError("the plain DiT baseline is class-conditional; use family 'c2i'")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "choose a head count that divides the width"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE (x and y pairs)"
            )
        for side in self.image_size:
            if side % self.patch_size:
                raise ConfigError(
                    f"image_size {self.image_size} is not a multiple of patch_size "
                    f"{self.patch_size}"
                )
        if self.architecture == "deco" and not (self.decoder_depth and self.decoder_hidden_size):
            raise ConfigError(
                "architecture 'deco' needs decoder_depth and decoder_hidden_size >= 1 (use "
                "architecture 'dit' for a model without the pixel decoder)"
            )
        if self.family == "t2i" and not (self.text_len and self.text_dim):
            raise ConfigError("family 't2i' needs text_len and text_dim >= 1")
        if self.family == "c2i":
            used = [k for k in _TEXT_FIELDS if getattr(self, k)]
            if used:
                raise ConfigError(
                    f"only family 't2i' uses {', '.join(used)}; set them to 0 or family to 't2i'"
                )

    # -- derived sizes -----------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (CFG) class: the last row of the label table."""
        return self.num_classes

    @property
    def mlp_hidden_size(self) -> int:
        """SwiGLU width. c2i: int(2 * 4D / 3), without rounding (3072 for D=1152), as the
        released class-conditional weights have it; t2i: 4D, as the text-to-image release has."""
        if self.is_text_to_image:
            return 4 * self.hidden_size
        return int(2 * (4 * self.hidden_size) / 3)

    @property
    def has_decoder(self) -> bool:
        """DeCo (a DiT plus the pixel decoder) rather than the plain pixel DiT: the model has
        decoder graphs and the DiT sharing they make possible."""
        return self.architecture == "deco"

    @property
    def is_text_to_image(self) -> bool:
        """The DiT is conditioned on text embeddings (family "t2i"), not on class labels."""
        return self.family == "t2i"

    def same_weights_as(self, other: ModelConfig) -> bool:
        """Whether ``other`` describes the same weights: equal in everything but the native
        ``image_size`` (a model runs at any multiple of its patch size)."""
        return dataclasses.replace(self, image_size=other.image_size) == other

    def num_tokens(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    # -- serialisation -----------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The fields in declaration order, ``image_size`` as a list; the later fields only
        where they differ from their defaults."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value == f.default:
                continue
            out[f.name] = list(value) if f.name == "image_size" else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "model config",
                  fix: str = "correct it or write it again with a current deco-export"
                  ) -> ModelConfig:
        """Read a config, checking that every field is present (the later ones may be left out
        and then take their defaults), typed and in range. ``where`` (a file name, a manifest
        section) starts every error message and ``fix`` ends it."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}; {fix}")
        known = cls.field_names()
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown DeCo config keys {unknown}; expected a subset of "
                f"{sorted(known)}"
            )
        missing = [k for k in known if k not in _OPTIONAL and k not in d]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}; {fix}")
        values = dict(d)
        if isinstance(values["image_size"], int) and not isinstance(values["image_size"], bool):
            values["image_size"] = (values["image_size"], values["image_size"])
        for key in ("family", "architecture"):
            if key in values and not isinstance(values[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {values[key]!r}; {fix}")
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}; {fix}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "config.json") -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: not valid JSON ({exc}); the file is damaged, write it again"
            ) from None
        return cls.from_dict(data, where=where)
