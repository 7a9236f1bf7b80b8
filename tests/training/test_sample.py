"""The small training-side Euler sampler reproduces the reference sampler's golden output."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from runtimes.image import save_grid, to_uint8
from training.sample import euler_sample, grid_labels


def test_euler_sampler_matches_reference(golden, golden_model, golden_meta):
    s = golden_meta["sampler"]
    x = euler_sample(
        golden_model,
        torch.from_numpy(golden["noise"]),
        torch.from_numpy(golden["labels"]),
        num_steps=s["num_steps"],
        cfg_scale=s["cfg_scale"],
        interval_low=s["guidance_interval"][0],
    )
    np.testing.assert_allclose(x.numpy(), golden["sample"], atol=1e-4, rtol=0)
    assert np.array_equal(to_uint8(x.numpy()), golden["image_uint8"])


def test_grid_helpers(tmp_path):
    labels = grid_labels(1000, per_class=3)
    assert len(labels) == 30 and labels[0] == 0 and labels[-1] == 999
    assert grid_labels(2, per_class=2).tolist() == [0, 0, 1, 1]
    imgs = np.zeros((5, 4, 6, 3), dtype=np.uint8)
    path = save_grid(imgs, tmp_path / "g.png", cols=2, scale=2, pad_value=255)
    assert Image.open(path).size == (2 * 6 * 2, 3 * 4 * 2)
