"""DeCoPipeline: argument validation, output types, seeds, defaults, sharing calibration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import runtimes
from runtimes.bundle import Manifest, read_manifest, verify, write_manifest
from tests.helpers import REPO, GaussianFlowBackend


def _pipe(**defaults):
    be = GaussianFlowBackend()
    sd = {"solver": "euler", "steps": 6, "guidance": 2.0, "guidance_interval": [0.2, 1.0],
          "shift": 1.0, **defaults}
    return runtimes.DeCoPipeline(be, be.model_config(), sd)


def test_output_types():
    pipe = _pipe()
    pil = pipe.generate([0, 2], seed=1).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    x = pipe.generate([0, 2], seed=1, output_type="np").images
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    u8 = pipe.generate([0, 2], seed=1, output_type="uint8").images
    assert u8.shape == (2, 8, 8, 3) and np.array_equal(u8, runtimes.to_uint8(x))
    assert np.array_equal(np.asarray(pil[1]), u8[1])
    unconditional = pipe.generate([3], seed=1, output_type="np").images  # label 3 = null class
    assert unconditional.shape == (1, 3, 8, 8)


def test_seed_noise_and_batch_composition():
    pipe = _pipe()
    both = pipe.generate([0, 2], seed=3, output_type="np")
    assert both.seed == 3 and both.class_labels == [0, 2]
    alone = pipe.generate([0], seed=3, output_type="np").images
    assert np.array_equal(both.images[0], alone[0])
    noise = runtimes.sample_noise(3, 2, 3, 8, 8)
    given = pipe.generate([0, 2], noise=noise, output_type="np")
    assert given.seed is None and np.array_equal(given.images, both.images)


def test_defaults_and_overrides():
    pipe = _pipe()
    out = pipe.generate([1], output_type="np")
    assert out.cost.steps == 6 and out.config.guidance == 2.0
    out = pipe.generate([1], steps=4, solver="heun", guidance=1.0, output_type="np")
    assert out.cost.evaluations == 7 and out.cost.dit_samples == 7
    out = pipe.generate([1], timesteps=[0.0, 0.5, 1.0], output_type="np")
    assert out.cost.steps == 2
    out = pipe.generate([1, 2], steps=10, sharing=0.5, output_type="np")
    assert out.cost.dit_calls == 5 and out.cost.decoder_calls == 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_labels": [4]}, r"class label 4 is out of range: .* use 0..2 \(or 3, the null"),
        ({"class_labels": [-1]}, "out of range"),
        ({"class_labels": []}, "class_labels is empty"),
        ({"class_labels": [0.5]}, "not an integer"),
        ({"class_labels": [0], "height": 10}, r"height=10 is not a positive multiple of the patch"),
        ({"class_labels": [0], "width": 0}, "width=0"),
        ({"class_labels": [0], "noise": np.zeros((2, 3, 8, 8))}, r"noise has shape \(2, 3, 8, 8\)"),
        ({"class_labels": [0], "noise": np.full((1, 3, 8, 8), np.nan)}, "NaN"),
        ({"class_labels": [0], "output_type": "tensor"}, "output_type must be one of"),
        ({"class_labels": [0], "cfg_mode": "slow"}, "cfg_mode must be one of"),
        ({"class_labels": [0], "guidance": -1.0}, "guidance must be"),
        ({"class_labels": [0], "steps": 3, "timesteps": [0, 1]}, "need steps"),
        ({"class_labels": [0], "sharing": "dp-k10"}, "unknown sharing schedule"),
    ],
)
def test_bad_arguments_raise_value_errors_that_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _pipe().generate(**kwargs)


def test_calibrate_record_and_use_a_dp_schedule(tmp_path):
    be = GaussianFlowBackend()
    pipe = runtimes.DeCoPipeline(be, be.model_config(), {"steps": 8, "guidance": 2.0})
    result = pipe.calibrate_sharing([0, 1, 2], budgets=[3, 4], batch_size=2, model_hash="f" * 64)
    sim = result.similarity
    assert sim.shape == (8, 8) and np.allclose(sim, sim.T)
    assert np.allclose(np.diag(sim), 1, atol=1e-3)  # float16 storage
    assert sorted(result.schedules) == ["ffffffffffffffff-n8-s1-g2-k3",
                                        "ffffffffffffffff-n8-s1-g2-k4"]
    key = "ffffffffffffffff-n8-s1-g2-k3"
    sched = result.schedules[key]
    assert sched.budget == 3 and sched.dit_steps[0] == 0 and sched.method == "statistic_dp"

    root = tmp_path / "bundle"
    root.mkdir()
    write_manifest(root, Manifest(model=be.model_config(), sampler_defaults={"steps": 8}))
    runtimes.record_schedule(root, key, sched)
    manifest = read_manifest(root)
    assert manifest.schedules[key]["dit_steps"] == list(sched.dit_steps)
    assert verify(root) == []
    (root / manifest.schedules[key]["file"]).write_text("{}")
    assert verify(root)[0].startswith(f"schedules/{key}.json:")

    pipe = runtimes.DeCoPipeline(be, manifest.model, manifest.sampler_defaults,
                                 schedules=manifest.schedules)
    out = pipe.generate([1], sharing=key, output_type="np")
    assert out.cost.dit_calls == 3
    with pytest.raises(ValueError, match="made for 8 model evaluations"):
        pipe.generate([1], steps=9, sharing=key)


def test_register_backend_and_load(tmp_path):
    be = GaussianFlowBackend()
    root = tmp_path / "bundle"
    root.mkdir()
    write_manifest(root, Manifest(model=be.model_config(), sampler_defaults={"steps": 3}))
    seen = {}

    def factory(bundle_dir, manifest, precision, **options):
        seen.update(dir=bundle_dir, precision=precision, **options)
        return be

    runtimes.register_backend("analytic-test", factory)
    assert "analytic-test" in runtimes.available_backends()
    with runtimes.load(root, backend="analytic-test", precision="bf16", providers=["x"]) as pipe:
        assert pipe.generate([2], output_type="np").cost.steps == 3
    assert seen == {"dir": root, "precision": "bf16", "providers": ["x"]}


NUMPY_ONLY = textwrap.dedent(
    """
    import importlib.abc, sys

    ALLOWED = {"numpy", "runtimes"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top not in ALLOWED and top not in sys.stdlib_module_names:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import runtimes

    class Linear:  # a backend in a dozen lines: what an application would write
        def dit(self, x, t, y):
            return x.reshape(len(x), 3, 4, 4).mean(axis=1, keepdims=True) * t[:, None, None, None]
        def decoder(self, x, cond):
            return -x + cond.mean()
        from_numpy = staticmethod(np.array)
        to_numpy = staticmethod(np.asarray)
        concat = staticmethod(np.concatenate)

    model = {"hidden_size": 4, "num_heads": 1, "dit_depth": 1, "decoder_hidden_size": 1,
             "decoder_depth": 1, "patch_size": 4, "num_classes": 2, "in_channels": 3,
             "image_size": [4, 4]}
    pipe = runtimes.DeCoPipeline(Linear(), model, {"steps": 4, "guidance": 2.0})
    out = pipe.generate([0, 1], output_type="uint8", sharing=0.5)
    assert out.images.shape == (2, 4, 4, 3) and out.images.dtype == np.uint8
    try:
        pipe.generate([0])
    except ImportError as exc:
        assert "pillow" in str(exc)
    else:
        raise AssertionError("PIL output should need pillow")
    print("ok")
    """
)


def test_runtimes_needs_only_numpy(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", NUMPY_ONLY], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
