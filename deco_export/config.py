"""Model configuration and named presets.

The config holds only what changes the weights' shapes or the forward pass; everything about
sampling lives in the runtime sampler. It round-trips through JSON so that a checkpoint
directory, an ONNX bundle and a training run all describe the same model the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

FAMILIES = ("c2i", "t2i")
ARCHITECTURES = ("deco", "dit")

# Fields added after the first release: omitted from to_dict when they hold their default, so
# class-conditional config.json files and manifests stay byte-identical.
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "family": "c2i", "text_len": 0, "text_dim": 0, "refine_depth": 0, "architecture": "deco",
}


# What a config file must give, and the smallest value of each integer field.
_REQUIRED = ("hidden_size", "num_heads", "dit_depth", "decoder_hidden_size", "decoder_depth",
             "patch_size", "num_classes", "in_channels", "image_size")
_INT_MINIMUM = {"hidden_size": 1, "num_heads": 1, "dit_depth": 1, "decoder_hidden_size": 1,
                "decoder_depth": 1, "patch_size": 1, "num_classes": 0, "in_channels": 1,
                "text_len": 0, "text_dim": 0, "refine_depth": 0}


@dataclass(frozen=True)
class DeCoConfig:
    """Shape of a DeCo model: class-conditional (``family="c2i"``, the reference's
    ``dit_c2i_DeCo.PixNerDiT``) or text-to-image (``family="t2i"``, ``dit_t2i_DeCo.PixNerDiT``).

    ``image_size`` is the native (height, width) the model was trained at; the model itself
    runs at any multiple of ``patch_size`` (c2i RoPE positions are normalised, t2i ones count
    tokens). The t2i fields: ``text_len`` tokens of width ``text_dim`` from the text encoder,
    ``refine_depth`` text-refine blocks; ``num_classes`` is unused there (0 in the presets).

    ``architecture`` is "deco" (DiT + pixel decoder) or "dit", the plain pixel DiT that DeCo is
    measured against (the reference ``FlattenDiT``, c2i only): ``dit_depth`` blocks, then a
    final layer straight to pixels, one graph; the decoder fields are unused there.
    """

    hidden_size: int = 1152
    num_heads: int = 16
    dit_depth: int = 28
    decoder_hidden_size: int = 32
    decoder_depth: int = 3
    patch_size: int = 16
    num_classes: int = 1000
    in_channels: int = 3
    image_size: tuple[int, int] = (256, 256)
    family: str = "c2i"
    text_len: int = 0
    text_dim: int = 0
    refine_depth: int = 0
    architecture: str = "deco"

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, not {self.family!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; choose one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        if self.architecture == "dit" and self.family != "c2i":
            raise ValueError("the plain DiT baseline is class-conditional; use family='c2i'")
        text_fields = {"text_len": self.text_len, "text_dim": self.text_dim}
        if self.family == "t2i" and min(text_fields.values()) < 1:
            raise ValueError(
                f"a t2i config needs text_len and text_dim >= 1 (got {text_fields}); give the "
                "text encoder's sequence length and width"
            )
        if self.family == "c2i" and (any(text_fields.values()) or self.refine_depth):
            raise ValueError(
                "text_len, text_dim and refine_depth are t2i fields; set family='t2i' or leave "
                "them at 0"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "choose a head count that divides the width"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE (x and y pairs)"
            )
        for side in self.image_size:
            if side % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size "
                    f"{self.patch_size}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (CFG) class: the last row of the label table."""
        return self.num_classes

    @property
    def mlp_hidden_size(self) -> int:
        """SwiGLU width. c2i: int(2 * 4D / 3), without rounding (3072 for D=1152); t2i: the
        fused w12 SwiGLU of the text-to-image model uses 4D (6144 for D=1536)."""
        if self.family == "t2i":
            return 4 * self.hidden_size
        return int(2 * (4 * self.hidden_size) / 3)

    def num_tokens(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        for key, default in _OPTIONAL_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeCoConfig:
        """A config from a file's dict: every shape field must be present (a missing one is
        never filled with the DeCo-XL defaults) and of the right type and range."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown DeCo config keys {unknown}; expected a subset of {sorted(known)}"
            )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(
                f"lacks {', '.join(missing)} (every shape field must be given); re-create the "
                "checkpoint or add the field"
            )
        for key, value in d.items():
            if key in _INT_MINIMUM and (isinstance(value, bool) or not isinstance(value, int)
                                        or value < _INT_MINIMUM[key]):
                need = "a positive integer" if _INT_MINIMUM[key] else "an integer >= 0"
                raise ValueError(f"{key} must be {need}, got {value!r}")
        size = d["image_size"]
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
            raise ValueError(f"image_size must be [height, width] in pixels, got {size!r}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeCoConfig:
        return cls.from_dict(json.loads(text))


def baseline_of(config: DeCoConfig) -> DeCoConfig:
    """The plain pixel DiT at DeCo's cost: the pixel decoder replaced by two more DiT blocks
    (the paper's equal-compute comparison, Table 1)."""
    if config.architecture != "deco":
        raise ValueError("baseline_of takes a DeCo config; this one is already a plain DiT")
    return dataclasses.replace(config, architecture="dit", dit_depth=config.dit_depth + 2)


_DECO_PRESETS: dict[str, DeCoConfig] = {
    # The released sizes (reference configs_c2i/DeCo_XL.yaml and DeCo_large.yaml).
    "DeCo-XL/16": DeCoConfig(1152, 16, 28, 32, 3, 16, 1000, 3, (256, 256)),
    "DeCo-XL/16-512": DeCoConfig(1152, 16, 28, 32, 3, 16, 1000, 3, (512, 512)),
    "DeCo-L/16": DeCoConfig(1024, 16, 22, 32, 3, 16, 1000, 3, (256, 256)),
    # Small sizes for tests, demos and CPU training.
    "DeCo-tiny/16": DeCoConfig(64, 4, 2, 32, 3, 16, 10, 3, (64, 64)),
    "DeCo-S/16": DeCoConfig(256, 4, 6, 32, 3, 16, 1000, 3, (256, 256)),
    "DeCo-S/4": DeCoConfig(256, 4, 6, 32, 3, 4, 10, 3, (32, 32)),
    "DeCo-XS/4": DeCoConfig(192, 3, 6, 32, 3, 4, 9, 3, (32, 32)),
    "DeCo-T/4": DeCoConfig(128, 2, 6, 32, 3, 4, 9, 3, (32, 32)),
    "DeCo-XS/8": DeCoConfig(192, 3, 6, 32, 3, 8, 9, 3, (64, 64)),
    # Text-to-image. The release (configs_t2i/sft_res512.yaml, 1,133,759,395 parameters): Qwen3
    # last hidden states of 128 x 2048, 4 text-refine blocks, trained last at 512x512.
    "DeCo-T2I": DeCoConfig(1536, 24, 16, 32, 3, 16, 0, 3, (512, 512), family="t2i",
                           text_len=128, text_dim=2048, refine_depth=4),
    # The golden fixture's size, and a small one on all-MiniLM-L6-v2 tokens (384 wide).
    "DeCo-T2I-tiny/16": DeCoConfig(64, 4, 2, 32, 3, 16, 0, 3, (64, 64), family="t2i",
                                   text_len=8, text_dim=48, refine_depth=2),
    "DeCo-T2I-S/8": DeCoConfig(192, 3, 6, 32, 3, 8, 0, 3, (64, 64), family="t2i",
                               text_len=32, text_dim=384, refine_depth=2),
    # The embedded text-to-image default's shape: 16 MiniLM tokens, 32x32, ~3M parameters.
    "DeCo-T2I-T/4": DeCoConfig(128, 2, 6, 32, 3, 4, 0, 3, (32, 32), family="t2i",
                               text_len=16, text_dim=384, refine_depth=2),
}

# One plain-DiT baseline per class-conditional DeCo size: "DiT-T/4" has DeCo-T/4's 6 blocks + 2
# instead of the decoder.
PRESETS: dict[str, DeCoConfig] = {
    **_DECO_PRESETS,
    **{"DiT" + name[len("DeCo"):]: baseline_of(c) for name, c in _DECO_PRESETS.items()
       if c.family == "c2i"},
}


def baseline_preset(name: str) -> str:
    """The baseline preset that matches a DeCo preset ("DeCo-T/4" -> "DiT-T/4")."""
    if name in PRESETS and PRESETS[name].architecture == "dit":
        return name
    base = "DiT" + name[len("DeCo"):]
    if not name.startswith("DeCo-") or base not in PRESETS:
        choices = ", ".join(n for n, c in PRESETS.items() if c.architecture == "dit")
        raise ValueError(f"no baseline for preset {name!r}; the baselines are {choices}")
    return base


def get_preset(name: str, **overrides: Any) -> DeCoConfig:
    """A preset by name, optionally with fields replaced (e.g. ``num_classes=9``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
