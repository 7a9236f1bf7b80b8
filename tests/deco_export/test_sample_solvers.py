"""`deco sample --solver/--steps/--guidance-edges/--fast` on the embedded class-conditional
model (PyTorch, 32x32: seconds)."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from deco_export.cli import main
from runtimes.sampler import FAST_SAMPLERS


def _sample(tmp_path, name: str, *args: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    r = CliRunner().invoke(main, ["sample", "default", "--classes", "0,3", "--seed", "2",
                                  "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    return np.asarray(Image.open(out)).astype(int)


def test_fast_is_the_documented_solver_and_steps_pair(tmp_path):
    preset = FAST_SAMPLERS["c2i"]
    fast = _sample(tmp_path, "fast", "--fast")
    edges = "--guidance-edges" if preset["guidance_edges"] else "--no-guidance-edges"
    spelled = _sample(tmp_path, "spelled", "--solver", preset["solver"], "--steps",
                      str(preset["num_steps"]), edges)
    assert np.array_equal(fast, spelled)
    euler = _sample(tmp_path, "euler", "--solver", "euler", "--steps", str(preset["num_steps"]))
    assert not np.array_equal(fast, euler) and fast.std() > 10


def test_an_unknown_solver_is_one_line():
    r = CliRunner().invoke(main, ["sample", "default", "--solver", "rk45", "--out", "x.png"])
    assert r.exit_code != 0 and "rk45" in r.output and "Traceback" not in r.output
