"""Training data: an image-folder dataset and two real datasets that work offline.

Every dataset yields uint8 images (H, W, C) with C = 3 (or 1 for grey data, expanded to RGB on
the batch) plus an int64 class label. Batches stay uint8 until they reach the device, where
``to_model_input`` turns them into the reference's [-1, 1] float tensors: this keeps host
memory, host-to-device traffic and data-loading work four times smaller than float batches.

Built-in datasets (``load_dataset`` names):

- ``fashion-mnist``: Debian ``dataset-fashion-mnist``; 60,000 train / 10,000 test, 10 classes.
  The 28×28 grey images are scaled by size/32 and centred on a black canvas (at 32×32 that is
  exactly a 2-pixel pad), so the framing is the same at every resolution. Held-out split = the
  official test set.
- ``emoji``: Debian ``fonts-noto-color-emoji`` + ``unicode-data``; every fully-qualified emoji
  of ``emoji-test.txt`` (3,655), rendered with Pillow from the 109 px colour strike
  (136×128 cells), composited on white, centred on a white square and resized with LANCZOS.
  Label = the emoji's Unicode group (9 classes). ``emoji-base`` drops the skin-tone variants
  (U+1F3FB..U+1F3FF; 1,870 emoji), which otherwise make "People & Body" 59 % of the data.
  The held-out split takes about 10 % of the *base* emoji with all their skin-tone variants, so
  no near-duplicate of a held-out image is trained on. Renders are cached as ``.npy``.
- any other value is a folder with one sub-folder per class (sorted names = class indices),
  preprocessed like the reference (ADM centre crop: box-halve while the short side is at least
  twice the target, bicubic resize, centre crop). Held-out split by a hash of each file's path.

Emoji and Fashion-MNIST are drawn art and product photos on flat backgrounds, not natural
photographs: results on them say nothing about ImageNet.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from runtimes.cache import cache_dir as default_cache_dir
from runtimes.errors import DecoError
from runtimes.fileio import atomic_open

__all__ = [
    "EMOJI_FONT",
    "EMOJI_TEST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "INSTALL_COMMAND",
    "ArrayDataset",
    "DatasetMissingError",
    "ImageFolder",
    "center_crop_arr",
    "collate",
    "emoji_split",
    "load_dataset",
    "to_model_input",
    "to_unit_range",
]

INSTALL_COMMAND = (
    "apt-get update && apt-get install -y dataset-fashion-mnist fonts-noto-color-emoji unicode-data"
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


class DatasetMissingError(DecoError, FileNotFoundError):
    """A built-in dataset's Debian package is not installed; the message names the command."""

    def __init__(self, what: str, path: Path) -> None:
        super().__init__(f"{what} not found at {path}; install it with: {INSTALL_COMMAND}")


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) → float32 (B, 3, H, W) in [0, 1] (grey repeated to RGB)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) → float32 (B, 3, H, W) in [-1, 1], as ``Normalize(0.5, 0.5)`` does."""
    return (to_unit_range(images) - 0.5) / 0.5


def collate(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for both per-item datasets and ``ArrayDataset.__getitems__`` (already batched)."""
    if isinstance(batch, tuple):
        return batch
    return default_collate(batch)


@dataclass
class ArrayDataset(Dataset):
    """An in-memory dataset: uint8 images (N, H, W, C) and int64 labels (N,).

    ``__getitems__`` hands the DataLoader a whole batch with one gather, so a small dataset
    costs nothing per step beyond the index copy.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, keep: np.ndarray) -> ArrayDataset:
        k = torch.from_numpy(np.flatnonzero(keep))
        return ArrayDataset(self.images[k], self.labels[k], self.class_names)


# ------------------------------------------------------------------------------------------------
# Image folder (reference preprocessing)
# ------------------------------------------------------------------------------------------------


# Pillow's modes of 16-bit (and 32-bit integer) grayscale, whose convert("RGB") clips every
# value above 255 to white.
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_rgb(path: Path) -> Image.Image:
    """An image file as 8-bit RGB: 16-bit grayscale is scaled to 8 bits (not clipped to white).

    An unreadable file, or one Pillow refuses as a decompression bomb, raises ValueError naming
    it: a run stops rather than skip it, since a silently smaller data set changes its results.
    """
    try:
        with Image.open(path) as im:
            if im.mode in WIDE_GRAY_MODES:
                wide = np.asarray(im).astype(np.float64) / 257.0  # 65535 -> 255
                return Image.fromarray(np.round(wide).clip(0, 255).astype(np.uint8), "L"
                                       ).convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{path}: cannot read this image ({' '.join(str(err).split())}); remove or "
            "replace the file and run again"
        ) from None


def center_crop_arr(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """ADM centre crop to (H, W): box-halve while large, bicubic resize, centre crop.

    For a square target this is guided-diffusion's ``center_crop_arr``, the reference's
    ImageNet preprocessing; a non-square target scales so that both sides cover it.
    """
    h, w = size
    while min(image.size[0] / w, image.size[1] / h) >= 2:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = max(w / image.size[0], h / image.size[1])
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    y0, x0 = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
    return arr[y0 : y0 + h, x0 : x0 + w]


def _in_split(key: str, split: str, holdout: float) -> bool:
    """Stable, platform-independent split: crc32 of a key, 1 in 1000 resolution."""
    held = (zlib.crc32(key.encode("utf-8")) % 1000) < round(holdout * 1000)
    return held if split == "test" else not held


class ImageFolder(Dataset):
    """``root/<class>/<image>`` read lazily (use DataLoader workers for large folders)."""

    def __init__(
        self,
        root: str | Path,
        image_size: tuple[int, int],
        split: str = "train",
        holdout: float = 0.05,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        self.class_names = tuple(sorted(d.name for d in self.root.iterdir() if d.is_dir()))
        if not self.class_names:
            raise ValueError(f"{self.root} has no class sub-folders (expected root/<class>/*.png)")
        self.image_size = image_size
        self.items: list[tuple[Path, int]] = []
        for label, name in enumerate(self.class_names):
            for f in sorted((self.root / name).rglob("*")):
                rel = f.relative_to(self.root).as_posix()
                if f.suffix.lower() in IMAGE_EXTENSIONS and _in_split(rel, split, holdout):
                    self.items.append((f, label))
        if not self.items:
            raise ValueError(f"no images for split '{split}' under {self.root}")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        arr = center_crop_arr(open_rgb(path), self.image_size)
        return torch.from_numpy(arr.copy()), label

    def to_arrays(self) -> ArrayDataset:
        """Load everything into memory (small folders; evaluation)."""
        items = [self[i] for i in range(len(self))]
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items], dtype=torch.int64)
        return ArrayDataset(images, labels, self.class_names)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def fashion_mnist(
    split: str, image_size: tuple[int, int], root: Path | None = None
) -> ArrayDataset:
    root = root or FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise DatasetMissingError("Fashion-MNIST", p)
    images = _read_idx(img_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(lbl_path, 8).astype(np.int64)
    h, w = image_size
    inner = (max(1, round(28 * h / 32)), max(1, round(28 * w / 32)))
    if inner != (28, 28):
        images = np.stack(
            [np.asarray(Image.fromarray(im).resize(inner[::-1], Image.LANCZOS)) for im in images]
        )
    out = np.zeros((len(images), h, w, 1), dtype=np.uint8)
    y0, x0 = (h - inner[0]) // 2, (w - inner[1]) // 2
    out[:, y0 : y0 + inner[0], x0 : x0 + inner[1], 0] = images
    return ArrayDataset(torch.from_numpy(out), torch.from_numpy(labels), FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------
# Noto Color Emoji
# ------------------------------------------------------------------------------------------------


def read_emoji_test(path: Path | None = None) -> tuple[list[str], list[str], list[str]]:
    """Fully-qualified emoji of emoji-test.txt: (sequences, group names, group order)."""
    path = path or EMOJI_TEST
    if not path.is_file():
        raise DatasetMissingError("emoji-test.txt (unicode-data)", path)
    seqs, groups, order, group = [], [], [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        if not line.strip() or line.startswith("#"):
            continue
        cps, rest = line.split(";", 1)
        if rest.split("#", 1)[0].strip() != "fully-qualified":
            continue
        seqs.append("".join(chr(int(c, 16)) for c in cps.split()))
        groups.append(group)
        if group not in order:
            order.append(group)
    return seqs, groups, order


def render_emoji(
    seqs: Sequence[str], size: tuple[int, int], font_path: Path = EMOJI_FONT
) -> np.ndarray:
    """Render emoji on white: (N, H, W, 3) uint8, the 136×128 cell centred on a white square."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), 109)
    cell = (136, 128)
    side = max(cell)
    out = np.empty((len(seqs), size[0], size[1], 3), dtype=np.uint8)
    for i, s in enumerate(seqs):
        glyph = Image.new("RGBA", cell, (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((0, 0), s, font=font, embedded_color=True)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(glyph, ((side - cell[0]) // 2, (side - cell[1]) // 2))
        out[i] = np.asarray(square.convert("RGB").resize((size[1], size[0]), Image.LANCZOS))
    return out


def _file_key(*paths: Path) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def emoji(
    split: str,
    image_size: tuple[int, int],
    *,
    skin_tones: bool = True,
    holdout: float = 0.1,
    cache_dir: str | Path | None = None,
) -> ArrayDataset:
    """The emoji split with group labels (see the module docstring)."""
    return emoji_split(
        split, image_size, skin_tones=skin_tones, holdout=holdout, cache_dir=cache_dir
    )[0]


def emoji_split(
    split: str,
    image_size: tuple[int, int],
    *,
    skin_tones: bool = True,
    holdout: float = 0.1,
    cache_dir: str | Path | None = None,
) -> tuple[ArrayDataset, list[str]]:
    """The emoji split and each kept image's emoji sequence (for captions)."""
    if not EMOJI_FONT.is_file():
        raise DatasetMissingError("Noto Color Emoji font", EMOJI_FONT)
    seqs, groups, order = read_emoji_test()
    cache = Path(cache_dir or default_cache_dir()) / (
        f"emoji_{image_size[0]}x{image_size[1]}_{_file_key(EMOJI_FONT, EMOJI_TEST)}.npy"
    )
    if cache.is_file():
        images = np.load(cache)
    else:
        images = render_emoji(seqs, image_size, EMOJI_FONT)
        with atomic_open(cache, "wb") as f:
            np.save(f, images)
    labels = np.array([order.index(g) for g in groups], dtype=np.int64)
    base = ["".join(c for c in s if c not in _SKIN_TONES) for s in seqs]
    keep = np.array(
        [
            _in_split(b, split, holdout) and (skin_tones or b == s)
            for b, s in zip(base, seqs, strict=True)
        ]
    )
    ds = ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), tuple(order))
    return ds.subset(keep), [s for s, k in zip(seqs, keep, strict=True) if k]


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------

BUILTIN = ("emoji", "emoji-base", "fashion-mnist")


def load_dataset(
    name: str,
    split: str,
    image_size: tuple[int, int],
    *,
    cache_dir: str | Path | None = None,
    holdout: float | None = None,
) -> ArrayDataset | ImageFolder:
    """Load ``emoji``, ``emoji-base``, ``fashion-mnist`` or a class-per-folder path."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if name == "fashion-mnist":
        return fashion_mnist(split, image_size)
    if name in ("emoji", "emoji-base"):
        return emoji(
            split,
            image_size,
            skin_tones=name == "emoji",
            cache_dir=cache_dir,
            holdout=0.1 if holdout is None else holdout,
        )
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"unknown dataset '{name}': use {', '.join(BUILTIN)} or a folder of class folders"
        )
    return ImageFolder(path, image_size, split, 0.05 if holdout is None else holdout)
