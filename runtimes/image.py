"""Sample -> image conversion, grids and atomic PNG writing.

Pillow is imported only inside the functions that produce PIL images, so ``import runtimes``
needs numpy alone.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import DecoError
from runtimes.fileio import atomic_write_bytes

__all__ = [
    "IMAGE_FORMATS",
    "ImageInputError",
    "image_format",
    "image_input",
    "legible_scale",
    "make_grid",
    "mask_input",
    "png_text",
    "save_grid",
    "save_image",
    "save_png",
    "to_pil",
    "to_uint8",
]


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PIL output needs pillow: `pip install pillow`, or ask for output_type='uint8'/'np'"
        ) from exc
    return Image


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """(B, C, H, W) samples in [-1, 1] -> (B, H, W, C) uint8, exactly as the reference.

    uint8 = clip((x + 1) * 127.5 + 0.5, 0, 255) computed in float32 and truncated, i.e.
    round-to-nearest, with no clamp before the affine map. NaN (a diverged sample) becomes 0.
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"samples must be (B, C, H, W), got shape {x.shape}")
    y = (x + np.float32(1.0)) * np.float32(127.5) + np.float32(0.5)
    y = np.nan_to_num(y, nan=0.0)
    y = np.clip(y, np.float32(0.0), np.float32(255.0))
    return np.ascontiguousarray(y.astype(np.uint8).transpose(0, 2, 3, 1))


def to_pil(images: np.ndarray) -> list[Any]:
    """(B, H, W, C) uint8 -> list of PIL images (RGB for 3 channels, L for 1)."""
    image_mod = _pil()
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"to_pil needs (B, H, W, C) uint8, got {arr.dtype} {arr.shape}")
    if arr.shape[-1] == 1:
        return [image_mod.fromarray(a[..., 0]) for a in arr]
    return [image_mod.fromarray(a) for a in arr]


def make_grid(
    images: Sequence[Any] | np.ndarray,
    cols: int | None = None,
    padding: int = 0,
    pad_value: int = 0,
    scale: int = 1,
) -> Any:
    """Tile images row-major into one grid.

    ``images`` is a list of PIL images (returns a PIL image) or a (B, H, W, C) uint8 array
    (returns an (H', W', C) uint8 array). ``cols`` defaults to ceil(sqrt(B)). ``scale`` enlarges
    every image by pixel repetition (nearest neighbour) so that small samples stay legible
    without inventing detail.
    """
    is_pil = not isinstance(images, np.ndarray)
    arr = np.stack([np.asarray(im) for im in images]) if is_pil else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"make_grid needs a non-empty batch of (H, W, C) images, got {arr.shape}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = arr.shape
    cols = int(cols) if cols else math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    rows = math.ceil(n / cols)
    grid = np.full(
        (rows * h + (rows - 1) * padding, cols * w + (cols - 1) * padding, c),
        pad_value,
        dtype=arr.dtype,
    )
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = r * (h + padding), q * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    if not is_pil:
        return grid
    image_mod = _pil()
    return image_mod.fromarray(grid[..., 0] if c == 1 else grid)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str | os.PathLike[str]) -> str:
    """The Pillow format for ``path``'s extension; ValueError for one it does not write (so a
    caller can refuse before sampling rather than write PNG bytes into ``x.jpg``)."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(
            f"{path}: unknown image type {suffix or '(no extension)'!r}; name the file "
            f"{' or '.join(sorted(set(IMAGE_FORMATS)))}"
        )
    return IMAGE_FORMATS[suffix]


def save_image(image: Any, path: str | os.PathLike[str]) -> Path:
    """Write a PIL image or (H, W, C) uint8 array atomically, in the format its extension
    names (.png, .jpg / .jpeg at quality 95, .webp lossless)."""
    fmt = image_format(path)
    if fmt == "PNG":
        return save_png(image, path)
    image_mod = _pil()
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        image = image_mod.fromarray(arr)
    buf = io.BytesIO()
    options: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {"lossless": True}
    image.save(buf, format=fmt, **options)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_png(image: Any, path: str | os.PathLike[str],
             text: dict[str, str] | None = None) -> Path:
    """Write a PIL image or (H, W, C) uint8 array as PNG atomically, with ``text`` as PNG
    text chunks (iTXt, so any Unicode; `png_text` reads them back).

    The file is written to a temporary name in the same directory and renamed over ``path``, so
    readers never see a half-written image and an interrupted run leaves the old file intact.
    """
    image_mod = _pil()
    path = Path(path)
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        image = image_mod.fromarray(arr)
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return path


def png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text chunks of the PNG at ``path`` (empty for another format or none)."""
    image_mod = _pil()
    with image_mod.open(path) as image:
        image.load()
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


def save_grid(
    images: Sequence[Any] | np.ndarray,
    path: str | os.PathLike[str],
    cols: int | None = None,
    padding: int = 0,
    scale: int = 1,
    pad_value: int = 0,
) -> Path:
    """`make_grid` then `save_image` (atomic; the format follows the extension)."""
    image_format(path)
    return save_image(
        make_grid(images, cols=cols, padding=padding, pad_value=pad_value, scale=scale), path)


def legible_scale(height: int, width: int, target: int = 128) -> int:
    """Integer enlargement that brings the shorter side of a sample to at least ``target``."""
    return max(1, -(-target // max(1, min(height, width))))


class ImageInputError(DecoError, ValueError):
    """An input image or mask of the wrong kind, mode, shape or value range."""


def _is_pil(image: Any) -> bool:
    return hasattr(image, "mode") and hasattr(image, "size") and hasattr(image, "getbands")


# Samples (output_type="np") overshoot [-1, 1] a little and are valid starts as they are; a value
# beyond this is another range (0..255 as float).
FLOAT_IMAGE_LIMIT = 3.0


def image_input(image: Any, channels: int = 3) -> np.ndarray:
    """An input image as (B, C, H, W) float32 in [-1, 1], the samples' own space.

    Takes a PIL image (RGB; L for a one-channel model) or a list of them, a uint8 array
    (H, W, C) or (B, H, W, C), or a float array (C, H, W) or (B, C, H, W) in [-1, 1] (what
    ``output_type="np"`` gives; its overshoot, up to ``FLOAT_IMAGE_LIMIT``, is kept as is).
    uint8 maps to x / 127.5 - 1, the inverse of `to_uint8`, so an image that passes through
    unchanged comes back as the same bytes.
    """
    if _is_pil(image) or (isinstance(image, (list, tuple)) and image and _is_pil(image[0])):
        pictures = [image] if _is_pil(image) else list(image)
        want = "RGB" if channels == 3 else "L"
        for picture in pictures:
            if picture.mode != want:
                raise ImageInputError(
                    f"the image is a {picture.mode} image; this model takes {want}: pass "
                    f"image.convert({want!r})"
                )
        if len({p.size for p in pictures}) != 1:
            raise ImageInputError(
                f"the images differ in size ({sorted({p.size for p in pictures})}); resize "
                "them to one size"
            )
        image = np.stack([np.asarray(p, dtype=np.uint8).reshape(p.size[1], p.size[0], -1)
                          for p in pictures])
    a = np.asarray(image)
    if a.dtype == np.uint8:
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != channels:
            raise ImageInputError(
                f"a uint8 image must be (H, W, {channels}) or (B, H, W, {channels}), got "
                f"{a.shape}"
            )
        out: np.ndarray = a.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5)
        return np.ascontiguousarray(out - np.float32(1.0))
    if not np.issubdtype(a.dtype, np.floating):
        raise ImageInputError(
            f"an image array must be uint8 (0..255) or float in [-1, 1], got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] != channels:
        raise ImageInputError(
            f"a float image must be ({channels}, H, W) or (B, {channels}, H, W) in [-1, 1], got "
            f"{a.shape}; uint8 images are (H, W, {channels})"
        )
    if not np.all(np.isfinite(a)):
        raise ImageInputError("the image holds NaN or infinite values; pass finite pixels")
    lo, hi = float(a.min()), float(a.max())
    if lo < -FLOAT_IMAGE_LIMIT or hi > FLOAT_IMAGE_LIMIT:
        raise ImageInputError(
            f"float image values must lie in [-1, 1] (the sample range), got [{lo:.3g}, "
            f"{hi:.3g}]; map a [0, 1] image with x * 2 - 1, or pass uint8"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def mask_input(mask: Any) -> np.ndarray:
    """An inpainting mask as (B, 1, H, W) float32 of 0 and 1: 1 (white) where the model
    generates, 0 (black) where the image is kept, as in diffusers.

    Takes a PIL image of mode L or 1 (or a list), or an array (H, W), (B, H, W) or
    (B, 1, H, W): bool, uint8 0..255 or float in [0, 1]; values are split at one half.
    """
    if _is_pil(mask) or (isinstance(mask, (list, tuple)) and mask and _is_pil(mask[0])):
        pictures = [mask] if _is_pil(mask) else list(mask)
        for picture in pictures:
            if picture.mode not in ("L", "1"):
                raise ImageInputError(
                    f"the mask is a {picture.mode} image; masks are black and white: pass "
                    "mask.convert('L')"
                )
        mask = np.stack([np.asarray(p.convert("L"), dtype=np.uint8) for p in pictures])
    a = np.asarray(mask)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] != 1:
        raise ImageInputError(f"a mask must be (H, W), (B, H, W) or (B, 1, H, W), got {a.shape}")
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return (a >= 128).astype(np.float32)
    if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)) or (
            a.size and (float(a.min()) < 0.0 or float(a.max()) > 1.0)):
        raise ImageInputError(
            "a mask must be bool, uint8 0..255 or float in [0, 1] (1 = generate, 0 = keep), got "
            f"dtype {a.dtype}" + (f" in [{float(np.nanmin(a)):.3g}, {float(np.nanmax(a)):.3g}]"
                                  if a.size and np.issubdtype(a.dtype, np.number) else "")
        )
    return (a >= 0.5).astype(np.float32)
