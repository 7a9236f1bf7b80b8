"""What an application user does from the command line: live previews and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from deco_export.cli import main
from deco_export.commands.group import INTERRUPTED, INTERRUPTED_STATUS
from tests.helpers import REPO


def test_preview_every_writes_the_clean_estimate(tmp_path):
    out = tmp_path / "s.png"
    args = ["sample", "default", "--classes", "0,4", "--steps", "4", "--preview-every", "3",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    preview = tmp_path / "s.preview.png"
    # The estimate after the last step is the image itself (x̂ = x_t + dt v, the Euler step).
    assert np.array_equal(np.asarray(Image.open(preview)), np.asarray(Image.open(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "s.preview.png"]
    result = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "b.png"), "--preview-every",
                                       "0"])
    assert result.exit_code != 0 and "--preview-every must be >= 1" in result.output


def test_sample_from_an_image_and_a_mask(tmp_path):
    start = tmp_path / "start.png"
    assert CliRunner().invoke(main, ["sample", "default", "--classes", "2", "--steps", "3",
                                     "--scale", "1", "--out", str(start)]).exit_code == 0
    common = ["sample", "default", "--classes", "0", "--steps", "5", "--scale", "1",
              "--image", str(start)]
    same = tmp_path / "same.png"
    result = CliRunner().invoke(main, [*common, "--strength", "0", "--out", str(same)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(same)), np.asarray(Image.open(start)))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).convert("RGB").save(tmp_path / "mask.png")  # read as greyscale
    inpainted = tmp_path / "inpainted.png"
    result = CliRunner().invoke(main, [*common, "--mask", str(tmp_path / "mask.png"),
                                       "--out", str(inpainted)])
    assert result.exit_code == 0, result.output
    got, was = np.asarray(Image.open(inpainted)), np.asarray(Image.open(start))
    assert np.array_equal(got[mask == 0], was[mask == 0]) and not np.array_equal(got, was)
    Image.new("RGBA", (32, 32)).save(tmp_path / "rgba.png")
    result = CliRunner().invoke(main, ["sample", "default", "--image", str(tmp_path / "rgba.png"),
                                       "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "RGBA image; this model takes RGB" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()
    result = CliRunner().invoke(main, ["sample", "default", "--strength", "0.5"])
    assert result.exit_code != 0 and "--strength and --mask need --image" in result.output


def _interrupt(args: list[str], cwd: Path, ready) -> subprocess.CompletedProcess:
    """Run ``deco ARGS``, send SIGINT once ``ready()`` holds, and return how it ended."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DECO_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "deco_export.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_ctrl_c_during_sample_exits_with_one_line_and_writes_nothing_half(tmp_path):
    preview = tmp_path / "s.preview.png"
    ended = _interrupt(["sample", "default", "--steps", "5000", "--preview-every", "1",
                        "--out", "s.png"], tmp_path, preview.exists)
    assert ended.returncode == INTERRUPTED_STATUS, ended.stderr[-2000:]
    assert "Traceback" not in ended.stderr
    assert _last_line(ended.stderr) == f"Error: {INTERRUPTED}"
    # The preview (complete: written atomically) is all there is; no grid, no temporary file.
    assert [p.name for p in tmp_path.iterdir()] == ["s.preview.png"]
    Image.open(preview).verify()


def test_ctrl_c_during_export_leaves_no_bundle_and_no_staging(tmp_path):
    def staging():
        return any(p.name.startswith(".bundle.staging-") for p in tmp_path.iterdir())

    ended = _interrupt(["export", "onnx", "default", "bundle"], tmp_path, staging)
    assert ended.returncode == INTERRUPTED_STATUS, ended.stderr[-2000:]
    assert "Traceback" not in ended.stderr
    assert _last_line(ended.stderr) == f"Error: {INTERRUPTED}"
    assert list(tmp_path.iterdir()) == []
