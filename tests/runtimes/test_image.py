"""Seeded noise and image conversion."""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.image import legible_scale, make_grid, save_grid, save_png, to_pil, to_uint8
from runtimes.noise import check_noise, sample_noise
from tests.helpers import FIXTURES

GOLDEN = FIXTURES / "deco_tiny_64.npz"


def test_uint8_matches_the_reference_golden_image():
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN} not present")
    g = np.load(GOLDEN)
    assert np.array_equal(to_uint8(g["sample"]), g["image_uint8"])


def test_uint8_rounds_to_nearest_and_clips():
    x = np.float32([-2.0, -1.0, 0.0, 1.0, 2.0, -1 + 0.9 / 127.5, np.nan]).reshape(1, 1, 1, 7)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 255, 255, 1, 0]
    assert to_uint8(np.zeros((2, 3, 4, 5), np.float32)).shape == (2, 4, 5, 3)


def test_noise_is_seeded_and_independent_of_batch_composition():
    a = sample_noise(7, 3, 3, 8, 8)
    assert a.dtype == np.float32 and a.shape == (3, 3, 8, 8)
    assert np.array_equal(a, sample_noise(7, 3, 3, 8, 8))
    assert np.array_equal(a[:2], sample_noise(7, 2, 3, 8, 8))
    assert np.array_equal(a[0], sample_noise([7], 1, 3, 8, 8)[0])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, sample_noise(8, 3, 3, 8, 8))
    # the documented recipe, so any runtime (or language) can reproduce it
    gen = np.random.Generator(np.random.Philox(np.random.SeedSequence([7, 2])))
    assert np.array_equal(a[2], gen.standard_normal((3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="one seed per image"):
        sample_noise([1, 2], 3, 3, 8, 8)


def test_check_noise_names_the_problem():
    good = np.zeros((2, 3, 8, 8), np.float64)
    assert check_noise(good, (2, 3, 8, 8)).dtype == np.float32
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\) but this call needs"):
        check_noise(good, (1, 3, 8, 8))
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        check_noise(bad, (2, 3, 8, 8))


def test_grid_and_atomic_png(tmp_path):
    imgs = (np.arange(5 * 4 * 6 * 3) % 256).astype(np.uint8).reshape(5, 4, 6, 3)
    grid = make_grid(imgs, cols=2, padding=1)
    assert grid.shape == (3 * 4 + 2, 2 * 6 + 1, 3)
    assert np.array_equal(grid[5:9, 7:13], imgs[3])
    pil = to_pil(imgs)
    pgrid = make_grid(pil)
    assert pgrid.size == (3 * 6, 2 * 4)
    out = save_png(pgrid, tmp_path / "sub" / "grid.png")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(pgrid))
    save_grid(pil, tmp_path / "sub" / "grid.png", cols=5)
    assert Image.open(out).size == (5 * 6, 4)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["grid.png"]


def test_grid_scale_repeats_pixels_and_small_samples_get_legible():
    imgs = (np.arange(2 * 2 * 3 * 3) % 256).astype(np.uint8).reshape(2, 2, 3, 3)
    grid = make_grid(imgs, cols=2, scale=3)
    assert grid.shape == (2 * 3, 2 * 3 * 3, 3)
    assert np.array_equal(grid[0:3, 9:12], np.full((3, 3, 3), imgs[1, 0, 0]))
    with pytest.raises(ValueError, match="scale"):
        make_grid(imgs, scale=0)
    assert legible_scale(32, 32) == 4
    assert legible_scale(28, 40) == 5
    assert legible_scale(256, 256) == 1
