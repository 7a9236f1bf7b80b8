"""scripts/serve_load.py, bounded to a few requests on the golden bundle: both modes run, every
request is answered, the batcher reports its images per tick, the servers exit 0 on SIGTERM and
the table, JSON and plot are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytest.importorskip("uvicorn", reason="deco serve needs the serve extra")
pytest.importorskip("httpx", reason="the load test's client is httpx")


@pytest.mark.slow
def test_load_script_runs_both_modes_and_stops_by_itself(golden_onnx_bundle, tmp_path):
    out, plot = tmp_path / "load.json", tmp_path / "load.png"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "scripts/serve_load.py", str(golden_onnx_bundle), "--requests", "3",
         "--multiples", "2", "--steps", "3", "--max-batch", "4", "--time-limit", "60",
         "--out-json", str(out), "--plot", str(plot)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    serial, batched = results["modes"].values()
    assert serial[0]["completed"] == batched[0]["completed"] == 3
    assert serial[0]["images_per_tick"] == 1.0 and batched[0]["images_per_tick"] >= 1.0
    assert "| step batcher (max 4) |" in run.stdout
    assert plot.stat().st_size > 0
