"""`deco sample --solver/--steps/--guidance-edges/--fast` on the embedded class-conditional
model and the text-to-image student (PyTorch, 32x32: seconds)."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from deco_export.cli import main
from runtimes.sampler import FAST_SAMPLERS, fast_psnr_db, fast_sampler


def _sample(tmp_path, name: str, *args: str, model: str = "default") -> np.ndarray:
    out = tmp_path / f"{name}.png"
    condition = ["--prompt", "red heart"] if "t2i" in model else ["--classes", "0,3"]
    r = CliRunner().invoke(main, ["sample", model, *condition, "--seed", "2",
                                  "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    return np.asarray(Image.open(out)).astype(int)


def _spelled(preset: dict) -> list[str]:
    """The documented flags of a `--fast` preset."""
    edges = "--guidance-edges" if preset["guidance_edges"] else "--no-guidance-edges"
    shift = ["--shift", str(preset["shift"])] if "shift" in preset else []
    return ["--solver", preset["solver"], "--steps", str(preset["num_steps"]), edges, *shift]


def test_fast_is_the_documented_solver_and_steps_pair(tmp_path):
    preset = FAST_SAMPLERS["c2i"]
    fast = _sample(tmp_path, "fast", "--fast")
    spelled = _sample(tmp_path, "spelled", *_spelled(preset))
    assert np.array_equal(fast, spelled)
    euler = _sample(tmp_path, "euler", "--solver", "euler", "--steps", str(preset["num_steps"]))
    assert not np.array_equal(fast, euler) and fast.std() > 10


def test_fast_text_to_image_is_its_documented_setting_shift_included(tmp_path):
    """The t2i preset samples at its own shift (docs/sampling.md); --shift overrides it."""
    preset = FAST_SAMPLERS["t2i"]
    fast = _sample(tmp_path, "fast", "--fast", model="default-t2i")
    assert np.array_equal(fast, _sample(tmp_path, "spelled", *_spelled(preset),
                                        model="default-t2i"))
    own = _sample(tmp_path, "own", "--fast", "--shift", "3", model="default-t2i")
    assert not np.array_equal(fast, own) and fast.std() > 10


def test_fast_on_a_guidance_distilled_model_is_the_students_own_setting(tmp_path):
    """The text-to-image student runs one pass per step, so its few-step setting is its own
    (docs/sampling.md), not its teacher family's."""
    preset = fast_sampler("t2i", guidance_distilled=True)
    assert preset != fast_sampler("t2i") == FAST_SAMPLERS["t2i"]
    model = "default-t2i-distilled"
    fast = _sample(tmp_path, "fast", "--fast", model=model)
    spelled = _sample(tmp_path, "spelled", *_spelled(preset), model=model)
    assert np.array_equal(fast, spelled)
    family = _sample(tmp_path, "family", *_spelled(FAST_SAMPLERS["t2i"]), model=model)
    assert not np.array_equal(fast, family)
    assert fast_sampler("c2i", guidance_distilled=True) == FAST_SAMPLERS["c2i-distilled"]
    # A student's tuned tables are its own: the teacher's PSNR threshold does not judge them.
    assert fast_psnr_db("c2i") is not None and fast_psnr_db("c2i", guidance_distilled=True) is None


def test_an_unknown_solver_is_one_line():
    r = CliRunner().invoke(main, ["sample", "default", "--solver", "rk45", "--out", "x.png"])
    assert r.exit_code != 0 and "rk45" in r.output and "Traceback" not in r.output
