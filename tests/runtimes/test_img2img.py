"""Image-to-image and inpainting: the start on the solver's grid, the kept pixels, the errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import runtimes
from runtimes.image import ImageInputError
from tests.helpers import GaussianFlowBackend
from tests.runtimes.test_sampler import FusedStepBackend


def _pipe(backend=None, **defaults):
    be = backend or GaussianFlowBackend()
    sd = {"solver": "euler", "steps": 10, "guidance": 1.0, "shift": 1.0, **defaults}
    return runtimes.DeCoPipeline(be, be.model_config(), sd)


def _picture(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(1, 3, 8, 8)).astype(np.float32)


def test_strength_zero_returns_the_input_in_every_form():
    pipe = _pipe()
    x = _picture()
    out = pipe.generate([1], image=x, strength=0.0, output_type="np")
    assert np.array_equal(out.images, x) and out.cost.steps == 0
    pil = runtimes.to_pil(runtimes.to_uint8(x))[0]
    back = pipe.generate([1], image=pil, strength=0.0).images[0]
    assert back.tobytes() == pil.tobytes()
    u8 = np.asarray(pil)
    assert np.array_equal(pipe.generate([0, 2], image=u8, strength=0, output_type="uint8").images,
                          np.stack([u8, u8]))
    assert pipe.backend.calls == []


def test_the_run_starts_at_one_minus_strength_on_the_solvers_grid():
    pipe = _pipe()
    grid = runtimes.timesteps(10)
    out = pipe.generate([1], image=_picture(), strength=0.6, output_type="np")
    assert out.cost.steps == 6 and out.config.grid()[0] == grid[4]  # t0 = 0.4
    assert np.array_equal(out.config.grid(), grid[4:])
    states = []
    pipe.generate([1], image=_picture(), strength=0.65, seed=3, on_step=states.append)
    assert states[0].t == float(grid[4])  # the first grid time at or above 0.35
    eps = runtimes.sample_noise(3, 1, 3, 8, 8)
    t0 = np.float32(grid[4])
    assert np.array_equal(states[0].latents, t0 * _picture() + (np.float32(1) - t0) * eps)
    # Strength 1 ignores the image: the generation from noise, bit for bit.
    full = pipe.generate([1], seed=3, output_type="np").images
    assert np.array_equal(pipe.generate([1], seed=3, image=_picture(), strength=1.0,
                                        output_type="np").images, full)


def test_image_to_image_follows_the_models_flow():
    """The Gaussian flow's ODE keeps z = (x_t - t mu) / sigma(t): from x_t0 it ends at
    mu + s z, so a fine solver must land there."""
    be = GaussianFlowBackend()
    pipe = _pipe(be, solver="heun", steps=100)
    x, eps = _picture(), runtimes.sample_noise(5, 1, 3, 8, 8)
    out = pipe.generate([2], image=x, strength=0.5, noise=eps, output_type="np")
    t0 = np.float64(out.config.grid()[0])
    sigma = np.sqrt(t0**2 * be.s**2 + (1 - t0) ** 2)
    x_t0 = t0 * x + (1 - t0) * eps.astype(np.float64)
    z = (x_t0 - t0 * be.means[[2]]) / sigma
    # Within the solver's error (its last step is Euler), and far from where it started.
    assert np.max(np.abs(out.images - (be.means[[2]] + be.s * z))) < 1e-3
    assert np.max(np.abs(out.images - x)) > 0.3


@pytest.mark.parametrize("backend, solver", [(GaussianFlowBackend, "euler"),
                                             (GaussianFlowBackend, "heun"),
                                             (GaussianFlowBackend, "ab2"),
                                             (FusedStepBackend, "euler")])
def test_inpainting_keeps_the_known_pixels_and_generates_the_rest(backend, solver):
    pipe = _pipe(backend(), solver=solver)
    x = _picture(1)
    mask = np.zeros((8, 8), np.float32)
    mask[2:6, 1:5] = 1.0  # generate here
    kept = mask[None, None].repeat(3, axis=1) == 0
    for strength in (1.0, 0.7):
        inpainted = pipe.generate([0, 1], image=x, mask_image=mask, strength=strength, seed=2,
                                  output_type="np").images
        free = pipe.generate([0, 1], image=x, strength=strength, seed=2, output_type="np").images
        for b in range(2):
            assert np.array_equal(inpainted[b][kept[0]], x[0][kept[0]])  # exactly the image
            # The analytic velocity is per pixel, so the generated region is the free run's.
            assert np.array_equal(inpainted[b][~kept[0]], free[b][~kept[0]])
    masks = [Image.fromarray((mask * 255).astype(np.uint8)), mask > 0.5, mask[None, None]]
    for m in masks:
        again = pipe.generate([0, 1], image=x, mask_image=m, seed=2, output_type="np").images
        assert np.array_equal(again, pipe.generate([0, 1], image=x, mask_image=mask, seed=2,
                                                   output_type="np").images)


def test_the_preview_of_an_inpainting_run_shows_the_kept_pixels():
    x, mask = _picture(), np.zeros((8, 8), bool)
    mask[:4] = True
    states = []
    _pipe().generate([0], image=x, mask_image=mask, on_step=states.append)
    assert np.array_equal(states[0].clean_estimate[0, :, 4:], x[0, :, 4:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image": np.zeros((1, 3, 16, 16), np.float32), "height": 8},
         r"the image is 16x16 \(HxW\) but this call generates 8x16"),
        ({"image": Image.new("RGBA", (8, 8))}, r"RGBA image; this model takes RGB: pass "
                                               r"image.convert\('RGB'\)"),
        ({"image": Image.new("L", (8, 8))}, "is a L image"),
        ({"image": np.full((3, 8, 8), 255.0, np.float32)}, r"must lie in \[-1, 1\].*x \* 2 - 1"),
        ({"image": np.full((3, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"image": np.zeros((8, 8, 4), np.uint8)}, r"uint8 image must be \(H, W, 3\)"),
        ({"image": np.zeros((3, 8, 8), np.int32)}, "dtype int32"),
        ({"image": [Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))]}, "differ in size"),
        ({"image": np.zeros((3, 3, 8, 8), np.float32)}, "holds 3 images for a batch of 1"),
        ({"image": np.zeros((3, 8, 8), np.float32), "mask_image": Image.new("RGB", (8, 8))},
         r"mask is a RGB image; .*convert\('L'\)"),
        ({"image": np.zeros((3, 8, 8), np.float32), "mask_image": np.ones((4, 4), bool)},
         "the mask is 4x4"),
        ({"image": np.zeros((3, 8, 8), np.float32), "mask_image": np.full((8, 8), 3.0)},
         r"float in \[0, 1\]"),
        ({"image": np.zeros((3, 8, 8), np.float32), "strength": 1.5},
         r"strength must be .*\[0, 1\]"),
        ({"strength": 0.5}, "need image="),
        ({"mask_image": np.ones((8, 8))}, "need image="),
    ],
)
def test_bad_images_and_masks_get_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        _pipe().generate([0], **kwargs)
    assert "\n" not in str(err.value)
    if "image" in kwargs and "strength" not in kwargs:
        assert isinstance(err.value, (ImageInputError, runtimes.SizeError))
