"""The suite's temp-dir guard (tests/conftest.py): each test runs with a temp dir of the run's
own, and what a test leaves there is named and removed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import MACHINE_STATE, leftovers


def test_each_run_has_a_temp_dir_of_its_own_that_subprocesses_inherit():
    private = Path(tempfile.gettempdir())
    assert private.name.startswith("deco-tests-") and os.environ["TMPDIR"] == str(private)
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(private)
    assert {p.name for p in private.iterdir()} <= MACHINE_STATE  # as the last test left it


def test_what_a_test_leaves_is_named_and_removed(tmp_path):
    (tmp_path / "tmp1x2y.mlpackage").mkdir()
    (tmp_path / "tmp1x2y.mlpackage" / "Manifest.json").write_text("{}")
    (tmp_path / "tmpq0.onnx").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "tmp1x2y.mlpackage")
    (tmp_path / ".ses").write_text("1\n")
    assert leftovers(tmp_path) == ["link", "tmp1x2y.mlpackage", "tmpq0.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == [".ses"]
    assert leftovers(tmp_path) == []
