"""runtimes.fileio (atomic files under the umask, hashes), runtimes.staging (directory swaps,
stale staging), runtimes.locks (the write lock) and runtimes.cache (one cache root)."""

from __future__ import annotations

import gc
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtimes import cache, fileio, locks, staging


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
    with staging.staging_dir(target) as staged:
        assert _mode(staged.path) == 0o755
        (staged.path / "m").write_text("1")
        staging.swap_directory(staged.path, target)
    assert (target / "m").read_text() == "1"
    assert _mode(target) == 0o755


def test_swap_replaces_an_existing_directory_whole(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old").write_text("o")
    with staging.staging_dir(target) as staged:
        (staged.path / "new").write_text("n")
        staging.swap_directory(staged.path, target)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_clean_stale_removes_only_dead_writers_dirs(tmp_path):
    target = tmp_path / "b"
    live = staging.staging_dir(target)
    dead = tmp_path / ".b.staging-1-dead"
    dead.mkdir()
    (dead / "x.onnx").write_text("partial")
    removed = staging.clean_stale(target)
    assert removed == [dead]
    assert live.path.is_dir()
    live.remove()


def test_a_staging_dir_dropped_before_its_owner_removed_it_leaves_nothing(tmp_path):
    """An interrupt between ``staging_dir(...)`` and the ``with`` that would remove it drops
    the object unowned: the directory goes with it."""
    made = staging.staging_dir(tmp_path / "b")
    path = made.path
    assert path.is_dir()
    del made
    gc.collect()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_childs_copy_of_a_staging_dir_leaves_the_parents_directory(tmp_path):
    made = staging.staging_dir(tmp_path / "b")
    child = os.fork()
    if child == 0:  # the child drops its copy; the directory is the parent's
        del made
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert made.path.is_dir()
    made.remove()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cleaner", ["removed it", "holds its lock"])
def test_a_staging_dir_taken_by_another_writers_cleaner_before_its_lock_is_made_again(
        tmp_path, monkeypatch, cleaner):
    """Between a staging directory's mkdir and its lock, another writer's `clean_stale` sees
    an unlocked directory and removes it: the writer must not go on with a lost directory."""
    target = tmp_path / "b"
    real_mkdir = os.mkdir
    taken: list[tuple[Path, int]] = []

    def mkdir_then_clean(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if Path(path).name.startswith(".b.staging-") and not taken:
            if cleaner == "removed it":
                taken.append((Path(path), -1))
                assert staging.clean_stale(target) == [Path(path)]
            else:  # the cleaner has locked it and removes it once the writer has moved on
                fd = os.open(path, os.O_RDONLY)
                assert locks.try_lock_descriptor(fd)
                taken.append((Path(path), fd))

    monkeypatch.setattr(os, "mkdir", mkdir_then_clean)
    live = staging.staging_dir(target)
    monkeypatch.undo()
    try:
        lost, fd = taken[0]
        if fd >= 0:
            shutil.rmtree(lost)
            os.close(fd)
        assert live.path != lost and live.path.is_dir()
        assert staging.clean_stale(target) == []
        assert live.path.is_dir()
    finally:
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
         "import sys, time; from runtimes import locks\n"
         f"with locks.lock({str(target)!r}):\n"
         "    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(locks.LockTimeout, match=r"being written by another process \(pid"), \
                locks.lock(target, timeout=0.3):
            pass
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    with locks.lock(target, timeout=5):  # the kernel dropped the dead holder's lock
        pass
    assert not locks.lock_path(target).exists()


def test_the_writers_names_still_import_from_fileio_without_loading_them_for_readers():
    probe = ("import sys; import runtimes, runtimes.fileio, runtimes.bundle\n"
             "print(sorted(m for m in ('runtimes.locks', 'runtimes.staging', 'filelock') "
             "if m in sys.modules))\n"
             "from runtimes.fileio import lock, LockTimeout, staging_dir, swap_directory\n"
             "import runtimes.locks as l, runtimes.staging as s\n"
             "assert (lock, LockTimeout) == (l.lock, l.LockTimeout)\n"
             "assert (staging_dir, swap_directory) == (s.staging_dir, s.swap_directory)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'describe_os_error'"):
        _ = fileio.describe_os_error


def test_one_cache_root_under_one_variable(monkeypatch, tmp_path):
    for name in ("DECO_CACHE_DIR", "DECO_CACHE", "DECO_COREML_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "deco"
    assert cache.cache_dir("openvino") == tmp_path / "xdg" / "deco" / "openvino"
    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path / "root"))
    assert cache.cache_dir("tensorrt") == tmp_path / "root" / "tensorrt"
    assert not (tmp_path / "root").exists()  # naming a cache creates nothing


def test_the_old_cache_variables_still_count_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.delenv("DECO_CACHE_DIR", raising=False)
    monkeypatch.setenv("DECO_CACHE", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match=r"\$DECO_CACHE is deprecated.*\$DECO_CACHE_DIR"):
        assert cache.cache_dir("fid") == tmp_path / "old" / "fid"
    monkeypatch.setenv("DECO_COREML_CACHE", str(tmp_path / "coreml-here"))
    with pytest.warns(FutureWarning, match=r"\$DECO_COREML_CACHE is deprecated"):
        assert cache.cache_dir("coreml") == tmp_path / "coreml-here"
    monkeypatch.setenv("DECO_CACHE_DIR", str(tmp_path / "new"))  # the new name wins, silently
    assert cache.cache_dir("coreml") == tmp_path / "new" / "coreml"


def test_the_new_errors_share_the_package_root():
    from deco_export.checkpoint import CheckpointError
    from deco_export.export.bundle_io import TargetError
    from runtimes.errors import DecoError
    from runtimes.sampler import SampleDiverged

    for error in (locks.LockTimeout, SampleDiverged, TargetError, CheckpointError):
        assert issubclass(error, DecoError), error
