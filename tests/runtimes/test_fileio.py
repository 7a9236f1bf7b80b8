"""runtimes.fileio: atomic files under the umask, directory swaps, stale staging, the lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtimes import fileio


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_follows_the_umask(tmp_path, umask_022):
    target = tmp_path / "a" / "f.json"
    fileio.atomic_write_text(target, "x")
    assert target.read_text() == "x"
    assert _mode(target) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "f"
    target.write_text("old")
    with pytest.raises(RuntimeError), fileio.atomic_open(target, "w") as fh:
        fh.write("new")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_staging_dir_and_swap_keep_the_umask(tmp_path, umask_022):
    target = tmp_path / "bundle"
    with fileio.staging_dir(target) as staging:
        assert _mode(staging.path) == 0o755
        (staging.path / "m").write_text("1")
        fileio.swap_directory(staging.path, target)
    assert (target / "m").read_text() == "1"
    assert _mode(target) == 0o755


def test_swap_replaces_an_existing_directory_whole(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old").write_text("o")
    with fileio.staging_dir(target) as staging:
        (staging.path / "new").write_text("n")
        fileio.swap_directory(staging.path, target)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_clean_stale_removes_only_dead_writers_dirs(tmp_path):
    target = tmp_path / "b"
    live = fileio.staging_dir(target)
    dead = tmp_path / ".b.staging-1-dead"
    dead.mkdir()
    (dead / "x.onnx").write_text("partial")
    removed = fileio.clean_stale(target)
    assert removed == [dead]
    assert live.path.is_dir()
    live.remove()


def test_tree_hash_ignores_symlinks(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a").write_text("a")
    before = fileio.sha256_path(tmp_path / "t")
    (tmp_path / "t" / "link").symlink_to("/etc/passwd")
    assert fileio.sha256_path(tmp_path / "t") == before
    assert fileio.path_size(tmp_path / "t") == 1


def test_second_writer_times_out_with_the_path(tmp_path):
    target = tmp_path / "bundle"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from runtimes import fileio\n"
         f"with fileio.lock({str(target)!r}):\n"
         "    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(fileio.LockTimeout, match="being written by another process"), \
                fileio.lock(target, timeout=0.3):
            pass
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    with fileio.lock(target, timeout=5):  # the kernel dropped the dead holder's lock
        pass
    assert not fileio.lock_path(target).exists()


def test_the_new_errors_share_the_package_root():
    from deco_export.checkpoint import CheckpointError
    from deco_export.export.bundle_io import TargetError
    from runtimes.errors import DecoError
    from runtimes.sampler import SampleDiverged

    for error in (fileio.LockTimeout, SampleDiverged, TargetError, CheckpointError):
        assert issubclass(error, DecoError), error
