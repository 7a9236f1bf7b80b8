"""The suite's machinery in tests/conftest.py: each test runs with a temp dir of the run's own,
and what a test leaves there is named and removed; the units xdist schedules."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import HEAVIEST_FIRST, MACHINE_STATE, SHARED_UNITS, leftovers, unit_of
from tests.helpers import REPO


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


def test_the_scheduling_tables_name_test_files_that_exist():
    """Files that share an export are one xdist unit; the heaviest-first table names units."""
    assert unit_of("tests/deco_export/test_bench_t2i.py::test_a") == unit_of(
        "tests/deco_export/test_faults_round3.py::test_b[2]") == "t2i_text_bundle"
    assert unit_of("tests/runtimes/test_sizes.py::test_c") == "tests/runtimes/test_sizes.py"
    for path in SHARED_UNITS:
        assert (REPO / path).is_file(), path
    units = set(SHARED_UNITS.values())
    for unit in HEAVIEST_FIRST:
        assert unit in units or (REPO / unit).is_file(), unit
