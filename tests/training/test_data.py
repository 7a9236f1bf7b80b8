"""Datasets: reference preprocessing, offline Fashion-MNIST and emoji, splits, install hint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.data as data
from training.data import (
    EMOJI_FONT,
    EMOJI_TEST,
    FASHION_MNIST_DIR,
    INSTALL_COMMAND,
    ArrayDataset,
    DatasetMissingError,
    ImageFolder,
    center_crop_arr,
    collate,
    load_dataset,
    to_model_input,
    to_unit_range,
)

needs_fashion = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason=f"Fashion-MNIST not installed ({INSTALL_COMMAND})"
)
needs_emoji = pytest.mark.skipif(
    not (EMOJI_FONT.is_file() and EMOJI_TEST.is_file()),
    reason=f"emoji font/data not installed ({INSTALL_COMMAND})",
)


def adm_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, verbatim in behaviour (the reference's ImageNet crop)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("size", [(300, 200), (97, 131), (64, 64)])
def test_center_crop_is_adm(size):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    np.testing.assert_array_equal(center_crop_arr(img, (32, 32)), adm_center_crop(img, 32))


def test_model_input_range():
    u8 = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3)
    x = to_model_input(u8.contiguous())
    assert x.shape == (1, 3, 1, 3)
    assert x.min() == -1 and x.max() == 1
    grey = torch.zeros(2, 4, 4, 1, dtype=torch.uint8)
    assert to_unit_range(grey).shape == (2, 3, 4, 4)


def test_image_folder_split_and_batches(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(30):
            Image.new("RGB", (40, 30), (i * 8, 0, 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    tr = ImageFolder(tmp_path, (16, 16), "train", holdout=0.2)
    te = ImageFolder(tmp_path, (16, 16), "test", holdout=0.2)
    assert tr.class_names == ("a", "b") and tr.num_classes == 2
    names = {p for p, _ in tr.items} | {p for p, _ in te.items}
    assert len(tr) + len(te) == 60 == len(names) and len(te) > 0
    img, label = tr[0]
    assert img.shape == (16, 16, 3) and img.dtype == torch.uint8 and label == 0
    images, labels = collate([tr[0], tr[1]])
    assert images.shape == (2, 16, 16, 3) and labels.dtype == torch.int64
    arr = te.to_arrays()
    assert isinstance(arr, ArrayDataset) and len(arr) == len(te)
    batch = arr.__getitems__([0, 1])
    assert collate(batch) is batch


def test_missing_dataset_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nope")
    monkeypatch.setattr(data, "EMOJI_TEST", tmp_path / "nope.txt")
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("fashion-mnist", "train", (32, 32))
    assert INSTALL_COMMAND in str(err.value)
    assert INSTALL_COMMAND == (
        "apt-get update && apt-get install -y dataset-fashion-mnist fonts-noto-color-emoji "
        "unicode-data"
    )
    with pytest.raises(DatasetMissingError, match="apt-get update && apt-get install -y"):
        data.emoji("train", (32, 32), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="unknown dataset"):
        load_dataset("imagenet-please", "train", (32, 32))


@needs_fashion
def test_fashion_mnist():
    tr = load_dataset("fashion-mnist", "train", (32, 32))
    te = load_dataset("fashion-mnist", "test", (32, 32))
    assert len(tr) == 60000 and len(te) == 10000 and tr.num_classes == 10
    assert tr.images.shape == (60000, 32, 32, 1)
    assert torch.bincount(te.labels).tolist() == [1000] * 10
    assert tr.images[:, :2].max() == 0 and tr.images[:, 2:30, 2:30].max() > 0  # 2-px pad


@needs_emoji
def test_emoji_reading_and_rendering():
    seqs, _, order = data.read_emoji_test()
    assert len(seqs) == 3655 and len(order) == 9 and "Component" not in order
    imgs = data.render_emoji(seqs[:3], (32, 32))
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.uint8
    assert (imgs[:, 0, 0] == 255).all()  # white background
    assert imgs.std() > 20  # something was drawn


@needs_emoji
def test_emoji_dataset_cached_and_split(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tr = load_dataset("emoji", "train", (16, 16), cache_dir=cache)
    te = load_dataset("emoji", "test", (16, 16), cache_dir=cache)
    assert len(tr) + len(te) == 3655 and 0.07 < len(te) / 3655 < 0.13
    assert tr.num_classes == 9 and len(list(Path(cache).glob("emoji_16x16_*.npy"))) == 1
    base_tr = load_dataset("emoji-base", "train", (16, 16), cache_dir=cache)
    base_te = load_dataset("emoji-base", "test", (16, 16), cache_dir=cache)
    assert len(base_tr) + len(base_te) == 1870
    # Skin-tone variants follow their base emoji into the same split.
    seqs, _, _ = data.read_emoji_test()
    strip = {chr(c) for c in range(0x1F3FB, 0x1F400)}
    test_bases = {"".join(ch for ch in s if ch not in strip) for s in seqs if data._in_split(
        "".join(ch for ch in s if ch not in strip), "test", 0.1)}  # fmt: skip
    train_bases = {"".join(ch for ch in s if ch not in strip) for s in seqs} - test_bases
    assert test_bases and train_bases and not (test_bases & train_bases)
