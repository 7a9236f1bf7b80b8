"""Captioned training data for the text-to-image family.

A captioned dataset yields ``(image, item)``: the uint8 image (H, W, C) as the class-label
datasets do, and the item's index, which the trainer maps to the item's captions
(``captions[item]``, one or more strings). The trainer picks one caption per image per step
from the shared step generator, so the choice is the same however the run is sharded or
resumed.

Sources (``load_captioned`` names):

- ``emoji`` / ``emoji-base``: the emoji renders and held-out split of :mod:`training.data`
  (whole emoji with their skin-tone variants held out), each captioned by its Unicode name
  from ``emoji-test.txt`` ("red heart", "waving hand: medium skin tone") and its CLDR keywords
  from Debian's ``unicode-cldr-core`` (``annotations/en.xml``: "heart | red heart"; skin-tone
  variants and sequences missing there take ``annotationsDerived/en.xml``, then the base
  emoji's keywords);
- a ``.jsonl`` file of ``{"path": ..., "caption": "..." | [...]}`` lines (paths relative to
  the file);
- a folder of images, each with a same-named ``.txt`` (one caption per non-empty line).

Held-out split of a file or folder source: a hash of the image's relative path, as for the
class folders.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .data import (
    _SKIN_TONES,
    EMOJI_TEST,
    IMAGE_EXTENSIONS,
    DatasetMissingError,
    _in_split,
    center_crop_arr,
    emoji_split,
    open_rgb,
)

__all__ = [
    "CLDR_ANNOTATIONS",
    "CLDR_DERIVED",
    "CaptionFolder",
    "CaptionedArrays",
    "caption_table",
    "emoji_captions",
    "load_captioned",
    "pick_captions",
    "read_cldr_keywords",
]

CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
CLDR_DERIVED = Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml")
CLDR_INSTALL = "apt-get update && apt-get install -y unicode-cldr-core"
_VS16 = "\ufe0f"
_NAME = re.compile(r"\s*\S+\s+E\d+\.\d+\s+(.*\S)\s*$")


@dataclass
class CaptionedArrays(Dataset):
    """In-memory images (N, H, W, C) uint8 with their captions (N lists of strings)."""

    images: torch.Tensor
    captions: list[tuple[str, ...]]

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.captions)} caption lists")
        for i, caps in enumerate(self.captions):
            if not caps:
                raise ValueError(f"item {i} has no caption")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], torch.tensor(i, dtype=torch.int64)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], idx


class CaptionFolder(Dataset):
    """Images with captions from a JSONL file or same-named ``.txt`` files, read lazily."""

    def __init__(
        self,
        source: str | Path,
        image_size: tuple[int, int],
        split: str = "train",
        holdout: float = 0.05,
    ) -> None:
        self.source = Path(source)
        self.image_size = image_size
        if self.source.is_file():
            pairs = self._read_jsonl(self.source)
            root = self.source.parent
        elif self.source.is_dir():
            pairs = self._read_folder(self.source)
            root = self.source
        else:
            raise FileNotFoundError(f"caption data not found: {self.source}")
        self.items: list[Path] = []
        self.captions: list[tuple[str, ...]] = []
        for path, caps in pairs:
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            if _in_split(rel, split, holdout):
                self.items.append(path)
                self.captions.append(caps)
        if not self.items:
            raise ValueError(f"no captioned images for split '{split}' in {self.source}")

    @staticmethod
    def _read_jsonl(path: Path) -> list[tuple[Path, tuple[str, ...]]]:
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, caption = rec["path"], rec["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{path}:{n}: expected a JSON object with 'path' and 'caption'"
                ) from None
            caps = (caption,) if isinstance(caption, str) else tuple(caption)
            caps = tuple(c.strip() for c in caps if isinstance(c, str) and c.strip())
            if not caps:
                raise ValueError(f"{path}:{n}: empty caption for {image}")
            full = (path.parent / image).resolve() if not Path(image).is_absolute() else Path(image)
            if not full.is_file():
                raise FileNotFoundError(f"{path}:{n}: image not found: {full}")
            pairs.append((full, caps))
        return pairs

    @staticmethod
    def _read_folder(root: Path) -> list[tuple[Path, tuple[str, ...]]]:
        pairs = []
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            txt = f.with_suffix(".txt")
            if not txt.is_file():
                raise FileNotFoundError(f"{f} has no caption file {txt.name} beside it")
            caps = tuple(x.strip() for x in txt.read_text(encoding="utf-8").splitlines())
            caps = tuple(c for c in caps if c)
            if not caps:
                raise ValueError(f"{txt} is empty; write one caption per line")
            pairs.append((f, caps))
        return pairs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr = center_crop_arr(open_rgb(self.items[i]), self.image_size)
        return torch.from_numpy(arr.copy()), torch.tensor(i, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# Emoji captions
# ------------------------------------------------------------------------------------------------


def read_emoji_names(path: Path | None = None) -> dict[str, str]:
    """Fully-qualified emoji of emoji-test.txt -> Unicode name ("red heart")."""
    path = path or EMOJI_TEST
    if not path.is_file():
        raise DatasetMissingError("emoji-test.txt (unicode-data)", path)
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cps, rest = line.split(";", 1)
        status, _, comment = rest.partition("#")
        if status.strip() != "fully-qualified":
            continue
        m = _NAME.match(comment)
        if m:
            names["".join(chr(int(c, 16)) for c in cps.split())] = m.group(1)
    return names


def read_cldr_keywords(path: Path) -> dict[str, str]:
    """CLDR annotations: code points (without U+FE0F) -> keywords "a | b | c" (no tts rows)."""
    out = {}
    for node in ET.parse(path).getroot().iter("annotation"):
        if node.get("type") != "tts" and node.text and node.get("cp"):
            out[node.get("cp", "")] = " | ".join(k.strip() for k in node.text.split("|"))
    return out


def emoji_captions(
    seqs: Sequence[str],
    annotations: Path = CLDR_ANNOTATIONS,
    derived: Path | None = CLDR_DERIVED,
    test_file: Path | None = None,
) -> list[tuple[str, ...]]:
    """Captions of each emoji: its Unicode name, then its CLDR keywords when known."""
    if not annotations.is_file():
        raise FileNotFoundError(
            f"CLDR annotations not found at {annotations}; install them with: {CLDR_INSTALL}"
        )
    names = read_emoji_names(test_file)
    keywords = read_cldr_keywords(derived) if derived is not None and derived.is_file() else {}
    keywords.update(read_cldr_keywords(annotations))
    out = []
    for s in seqs:
        caps = [names[s]]
        bare = s.replace(_VS16, "")
        base = "".join(c for c in bare if c not in _SKIN_TONES)
        kw = keywords.get(bare) or keywords.get(base)
        if kw and kw != caps[0]:
            caps.append(kw)
        out.append(tuple(caps))
    return out


def emoji_captioned(
    split: str,
    image_size: tuple[int, int],
    *,
    skin_tones: bool = True,
    holdout: float = 0.1,
    cache_dir: str | Path | None = None,
) -> CaptionedArrays:
    """The c2i emoji split (same renders, same held-out emoji) with captions."""
    ds, seqs = emoji_split(
        split, image_size, skin_tones=skin_tones, holdout=holdout, cache_dir=cache_dir
    )
    return CaptionedArrays(ds.images, emoji_captions(seqs))


def load_captioned(
    name: str,
    split: str,
    image_size: tuple[int, int],
    *,
    cache_dir: str | Path | None = None,
    holdout: float | None = None,
) -> CaptionedArrays | CaptionFolder:
    """``emoji``, ``emoji-base``, a JSONL file of path + caption, or a folder of image + .txt."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if name in ("emoji", "emoji-base"):
        return emoji_captioned(
            split, image_size, skin_tones=name == "emoji", cache_dir=cache_dir,
            holdout=0.1 if holdout is None else holdout,
        )  # fmt: skip
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"unknown caption data '{name}': use emoji, emoji-base, a .jsonl of path + caption "
            "or a folder of images with same-named .txt captions"
        )
    return CaptionFolder(path, image_size, split, 0.05 if holdout is None else holdout)


def caption_table(
    captions: Sequence[Sequence[str]],
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique captions ("" first: the empty prompt) and each item's caption ids.

    Returns (unique, flat ids, offsets, counts): item i's captions are
    ``unique[flat[offsets[i] + k]]`` for k < counts[i].
    """
    index = {"": 0}
    flat, offsets, counts = [], [], []
    for caps in captions:
        offsets.append(len(flat))
        counts.append(len(caps))
        for c in caps:
            flat.append(index.setdefault(c, len(index)))
    unique = list(index)
    as_long = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return unique, as_long(flat), as_long(offsets), as_long(counts)


def pick_captions(
    items: torch.Tensor, coins: torch.Tensor, flat: torch.Tensor, offsets: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """One caption id per item from uniform ``coins`` in [0, 1) (one of its captions each)."""
    n = counts[items]
    k = torch.clamp((coins * n).long(), max=n - 1)
    return flat[offsets[items] + k]

