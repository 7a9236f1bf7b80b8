"""`deco calibrate`: keyed schedule JSON, bundle manifest entries, the PNG, and `deco sample`
running a calibrated schedule; budget errors are one line and come before any sampling.

The golden tiny model at 64x64 with 4 steps keeps each calibration to about a second. The bundle
tests run the golden model through a registered torch backend instead of an ONNX export: the
manifest handling is what is under test here, and ONNX Runtime parity is tested elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import runtimes
from deco_export.calibrate import check_budgets, plot_similarity
from deco_export.cli import main
from runtimes.bundle import read_manifest, verify
from tests.helpers import torch_backed_bundle

STEPS = 4
TEST_BACKEND = "calibrate-test-torch"


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory, golden_ckpt) -> Path:
    from deco_export.checkpoint import convert_reference

    out = tmp_path_factory.mktemp("ck") / "tiny"
    return convert_reference(golden_ckpt, out, image_size=(64, 64))


@pytest.fixture(scope="module")
def weights_sha(golden_dir) -> str:
    from deco_export.checkpoint import read_metadata

    return read_metadata(golden_dir)["weights_sha256"]


@pytest.fixture
def golden_bundle(tmp_path, golden_dir) -> Path:
    """A bundle directory whose backend is the golden model in PyTorch."""
    return torch_backed_bundle(tmp_path / "bundle", golden_dir, TEST_BACKEND)


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _sample(source, out: Path, sharing: str | None, *extra: str) -> np.ndarray:
    args = ["sample", source, "--steps", STEPS, "--classes", "1", "--seed", "3", "--out", out,
            *extra]
    if sharing is not None:
        args += ["--sharing", sharing]
    _run(args)
    return np.asarray(Image.open(out))


def test_calibrate_checkpoint_writes_keyed_json_and_png(tmp_path, golden_dir, weights_sha):
    out, png = tmp_path / "sched.json", tmp_path / "sim.png"
    text = _run(["calibrate", golden_dir, "--steps", STEPS, "--budget", "2", "--budget", "2,3",
                 "--classes", "0,1", "--batch", "2", "--out", out, "--plot", png])
    stored = json.loads(out.read_text())["schedules"]
    prefix = f"{weights_sha[:16]}-n{STEPS}-s1-g3.2"
    assert sorted(stored) == [f"{prefix}-k2", f"{prefix}-k3"]  # duplicate budget dropped
    k2 = stored[f"{prefix}-k2"]
    assert k2["method"] == "statistic_dp" and k2["num_steps"] == STEPS and k2["mode"] == "reuse"
    assert len(k2["dit_steps"]) == 2 and k2["dit_steps"][0] == 0
    assert k2["guidance"] == 3.2 and k2["calibration_samples"] == 2
    assert f"{prefix}-k2: ratio 0.50" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `deco sample --sharing file.json#key` runs exactly the calibrated DiT steps.
    from_json = _sample(golden_dir, tmp_path / "a.png", f"{out}#{prefix}-k2")
    explicit = ",".join(str(s) for s in k2["dit_steps"])
    assert np.array_equal(from_json, _sample(golden_dir, tmp_path / "b.png", explicit))
    assert not np.array_equal(from_json, _sample(golden_dir, tmp_path / "c.png", None))


def test_calibrate_bundle_records_schedule_and_sample_uses_its_key(tmp_path, golden_bundle,
                                                                     weights_sha):
    out = tmp_path / "sched.json"
    _run(["calibrate", golden_bundle, "--backend", TEST_BACKEND, "--steps", STEPS, "--budget", "3",
          "--classes", "2", "--batch", "1", "--mode", "fresh_t", "--out", out])
    key = f"{weights_sha[:16]}-n{STEPS}-s1-g3.2-k3"
    manifest = read_manifest(golden_bundle)
    entry = manifest.schedules[key]
    assert entry["file"] == f"schedules/{key}.json" and entry["mode"] == "fresh_t"
    assert entry["dit_steps"] == json.loads(out.read_text())["schedules"][key]["dit_steps"]
    assert verify(golden_bundle) == []
    assert (tmp_path / f"sched-{key.rsplit('-k', 1)[0]}.png").is_file()  # default PNG name

    by_key = _sample(golden_bundle, tmp_path / "a.png", key, "--backend", TEST_BACKEND)
    explicit = ",".join(str(s) for s in entry["dit_steps"])
    same = _sample(golden_bundle, tmp_path / "b.png", explicit, "--backend", TEST_BACKEND,
                   "--sharing-mode", "fresh_t")
    assert np.array_equal(by_key, same)


@pytest.mark.parametrize("budget, message", [
    ("0", "budget K=0 is out of range: the sampler makes 4 model evaluations, so K must be in"),
    ("5", "budget K=5 is out of range"),
    ("two", "budget 'two' is not an integer"),
    (None, "give at least one --budget K"),
])
def test_budget_errors_are_one_line_and_come_first(tmp_path, golden_dir, budget, message):
    args = ["calibrate", str(golden_dir), "--steps", str(STEPS), "--out", str(tmp_path / "s.json")]
    if budget is not None:
        args += ["--budget", budget]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), result.output
    assert not (tmp_path / "s.json").exists()


def test_check_budgets_counts_solver_evaluations():
    assert check_budgets(["7", 3, "3,1"], 7) == [7, 3, 1]
    with pytest.raises(ValueError, match="K must be in 1..7"):
        check_budgets([8], 7)


def test_plot_marks_every_schedule(tmp_path):
    sim = np.fromfunction(lambda i, j: 1 - 0.01 * abs(i - j), (12, 12))
    schedules = {k: runtimes.dp_schedule(sim, k) for k in (2, 4, 6)}
    path = plot_similarity(sim, schedules, tmp_path / "sub" / "m.png", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300
