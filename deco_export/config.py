"""Named model presets; the config class itself is `runtimes.config.ModelConfig`, so a
checkpoint directory, an ONNX bundle and a training run all describe a model with the same
object. ``DeCoConfig``, its older name here, still imports, with a DeprecationWarning.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from runtimes.config import ARCHITECTURES, FAMILIES, ModelConfig
from runtimes.errors import ConfigError

__all__ = ["ARCHITECTURES", "FAMILIES", "PRESETS", "ModelConfig", "baseline_of",
           "baseline_preset", "get_preset"]



def __getattr__(name: str) -> Any:
    if name == "DeCoConfig":
        warnings.warn("deco_export.config.DeCoConfig is runtimes.config.ModelConfig; import "
                      "ModelConfig (DeCoConfig will be removed)", DeprecationWarning, stacklevel=2)
        return ModelConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_XL = dict(hidden_size=1152, num_heads=16, dit_depth=28, decoder_hidden_size=32, decoder_depth=3)

def baseline_of(config: ModelConfig) -> ModelConfig:
    """The plain pixel DiT at DeCo's cost: the pixel decoder replaced by two more DiT blocks
    (the paper's equal-compute comparison, Table 1)."""
    if not config.has_decoder:
        raise ConfigError("baseline_of takes a DeCo config; this one is already a plain DiT")
    return dataclasses.replace(config, architecture="dit", dit_depth=config.dit_depth + 2)


_DECO_PRESETS: dict[str, ModelConfig] = {
    # The released sizes (reference configs_c2i/DeCo_XL.yaml and DeCo_large.yaml).
    "DeCo-XL/16": ModelConfig(**_XL, patch_size=16, num_classes=1000, image_size=(256, 256)),
    "DeCo-XL/16-512": ModelConfig(**_XL, patch_size=16, num_classes=1000, image_size=(512, 512)),
    "DeCo-L/16": ModelConfig(hidden_size=1024, num_heads=16, dit_depth=22, decoder_hidden_size=32,
                            decoder_depth=3, patch_size=16, num_classes=1000,
                            image_size=(256, 256)),
    # Small sizes for tests, demos and CPU training.
    "DeCo-tiny/16": ModelConfig(hidden_size=64, num_heads=4, dit_depth=2, patch_size=16,
                               num_classes=10, image_size=(64, 64)),
    "DeCo-S/16": ModelConfig(hidden_size=256, num_heads=4, dit_depth=6, patch_size=16,
                            num_classes=1000, image_size=(256, 256)),
    "DeCo-S/4": ModelConfig(hidden_size=256, num_heads=4, dit_depth=6, patch_size=4,
                           num_classes=10, image_size=(32, 32)),
    "DeCo-XS/4": ModelConfig(hidden_size=192, num_heads=3, dit_depth=6, patch_size=4,
                            num_classes=9, image_size=(32, 32)),
    "DeCo-T/4": ModelConfig(hidden_size=128, num_heads=2, dit_depth=6, patch_size=4,
                           num_classes=9, image_size=(32, 32)),
    "DeCo-XS/8": ModelConfig(hidden_size=192, num_heads=3, dit_depth=6, patch_size=8,
                            num_classes=9, image_size=(64, 64)),
    # Text-to-image. The release (configs_t2i/sft_res512.yaml, 1,133,759,395 parameters): Qwen3
    # last hidden states of 128 x 2048, 4 text-refine blocks, trained last at 512x512.
    "DeCo-T2I": ModelConfig(hidden_size=1536, num_heads=24, dit_depth=16, patch_size=16,
                           num_classes=0, image_size=(512, 512), family="t2i", text_len=128,
                           text_dim=2048, refine_depth=4),
    # The golden fixture's size, and a small one on all-MiniLM-L6-v2 tokens (384 wide).
    "DeCo-T2I-tiny/16": ModelConfig(hidden_size=64, num_heads=4, dit_depth=2, patch_size=16,
                                   num_classes=0, image_size=(64, 64), family="t2i",
                                   text_len=8, text_dim=48, refine_depth=2),
    "DeCo-T2I-S/8": ModelConfig(hidden_size=192, num_heads=3, dit_depth=6, patch_size=8,
                               num_classes=0, image_size=(64, 64), family="t2i", text_len=32,
                               text_dim=384, refine_depth=2),
    # The embedded text-to-image default's shape: 16 MiniLM tokens, 32x32, ~3M parameters.
    "DeCo-T2I-T/4": ModelConfig(hidden_size=128, num_heads=2, dit_depth=6, patch_size=4,
                               num_classes=0, image_size=(32, 32), family="t2i", text_len=16,
                               text_dim=384, refine_depth=2),
}

# One plain-DiT baseline per class-conditional DeCo size: "DiT-T/4" has DeCo-T/4's 6 blocks + 2
# instead of the decoder.
PRESETS: dict[str, ModelConfig] = {
    **_DECO_PRESETS,
    **{"DiT" + name[len("DeCo"):]: baseline_of(c) for name, c in _DECO_PRESETS.items()
       if not c.is_text_to_image},
}


def baseline_preset(name: str) -> str:
    """The baseline preset that matches a DeCo preset ("DeCo-T/4" -> "DiT-T/4")."""
    if name in PRESETS and not PRESETS[name].has_decoder:
        return name
    base = "DiT" + name[len("DeCo"):]
    if not name.startswith("DeCo-") or base not in PRESETS:
        choices = ", ".join(n for n, c in PRESETS.items() if not c.has_decoder)
        raise ConfigError(f"no baseline for preset {name!r}; the baselines are {choices}")
    return base


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, optionally with fields replaced (e.g. ``num_classes=9``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
