"""An interrupt whose KeyboardInterrupt Python swallowed (it arrived while a finalizer ran)
still stops every commit."""

from __future__ import annotations

import gc
import os
import signal

import pytest

from runtimes import staging
from runtimes.fileio import atomic_write_text
from runtimes.interrupts import interrupts_deferred, interrupts_raise, raise_if_interrupted
from runtimes.staging import staging_dir, swap_directory
from tests.helpers import interrupted_inside_a_finalizer, sigint_raises

# The finalizer's KeyboardInterrupt is what Python ignores: pytest reports it as unraisable.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _sigint_raises():
    with sigint_raises():
        yield


def test_a_swallowed_interrupt_stops_an_atomic_write(tmp_path):
    with interrupts_raise():
        interrupted_inside_a_finalizer()  # returns: the KeyboardInterrupt went nowhere
        with pytest.raises(KeyboardInterrupt):
            atomic_write_text(tmp_path / "out.txt", "written after Ctrl-C")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_swallowed_interrupt_stops_a_directory_swap(tmp_path):
    target = tmp_path / "bundle"
    with interrupts_raise():
        with staging_dir(target) as staged:
            (staged.path / "manifest.json").write_text("{}")
            interrupted_inside_a_finalizer()
            with pytest.raises(KeyboardInterrupt):
                swap_directory(staged.path, target)
    assert list(tmp_path.iterdir()) == []


def test_outside_the_block_nothing_is_recorded(tmp_path):
    with interrupts_raise():
        pass
    with pytest.raises(KeyboardInterrupt):  # the handler raises as Python's own does
        os.kill(os.getpid(), signal.SIGINT)
    raise_if_interrupted()  # nothing was recorded
    atomic_write_text(tmp_path / "out.txt", "x")
    assert (tmp_path / "out.txt").read_text() == "x"
    (tmp_path / "out.txt").unlink()


def test_an_interrupt_inside_a_deferred_block_is_raised_when_it_ends(tmp_path):
    done = []
    with interrupts_raise():
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised here
                done.append("the rest of the block")
    assert done == ["the rest of the block"]


def test_an_interrupt_while_a_staging_dir_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The signal lands once the directory exists and is locked, before its owner has it: it is
    raised when the directory is guarded, and the directory goes."""
    real_hold = staging._hold

    def hold_then_signal(path):
        fd = real_hold(path)
        os.kill(os.getpid(), signal.SIGINT)
        return fd

    monkeypatch.setattr(staging, "_hold", hold_then_signal)
    with interrupts_raise():
        with pytest.raises(KeyboardInterrupt):
            staging_dir(tmp_path / "bundle")
    gc.collect()
    assert list(tmp_path.iterdir()) == []
