"""The write lock of a directory (a bundle, a checkpoint, a cache): one writer at a time.

A second writer waits up to a timeout, then fails with a message naming the directory and the
process that holds it. The lock is an OS file lock on ``.NAME.lock`` beside the directory,
taken through `filelock` (``flock`` on POSIX, ``LockFileEx`` on Windows), so the OS drops it
when its holder exits, however it exits. Readers never lock; only writers import this module.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from runtimes.errors import DecoError

__all__ = ["DEFAULT_LOCK_TIMEOUT", "LOCK_TIMEOUT_ENV", "LockTimeout", "lock", "lock_path",
           "still_names", "try_lock_descriptor"]

LOCK_TIMEOUT_ENV = "DECO_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0  # seconds; a large export's commit can take a while on a slow disk


class LockTimeout(DecoError, TimeoutError):
    """Another process holds the write lock of a directory for longer than the timeout.

    Also a TimeoutError, for callers that wait on other things too.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "timed out waiting for a write lock"


def try_lock_descriptor(fd: int) -> bool:
    """Take the exclusive OS lock of an open descriptor without waiting; False while another
    process holds it. `filelock` is imported here, so importing `runtimes` never needs it."""
    from filelock import lock_descriptor

    return lock_descriptor(fd, blocking=False)


def still_names(path: str | os.PathLike[str], fd: int) -> bool:
    """Whether ``path`` still names the file or directory open as ``fd``: one that was
    removed (or replaced) after it was opened leaves its opener locking something no other
    process will ever look at."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``.NAME.lock`` beside it (inside it, it would be swapped
    away with the directory)."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def _timeout(timeout: float | None) -> float:
    if timeout is not None:
        return timeout
    try:
        return float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT


@contextlib.contextmanager
def lock(target: str | os.PathLike[str], timeout: float | None = None,
         poll: float = 0.05) -> Iterator[Path]:
    """Hold the exclusive write lock of ``target`` (a directory that may not exist yet).

    Waits up to ``timeout`` seconds (default: $DECO_LOCK_TIMEOUT or 600) for another writer,
    then raises `LockTimeout`. The holder removes the lock file when it is done; a waiter that
    then locks the removed file notices (its inode is no longer the path's) and locks the new
    one, so no lock file is left behind and no two writers ever hold "the" lock at once."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = _timeout(timeout)
    deadline = time.monotonic() + limit
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = try_lock_descriptor(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            holder = _read_holder(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"{Path(target)} is being written by another process{holder} (lock {path} "
                    f"held for over {limit:g} s); wait for it to finish and run the command "
                    f"again, or raise {LOCK_TIMEOUT_ENV}"
                ) from None
            time.sleep(poll)
            continue
        if not still_names(path, fd):
            os.close(fd)  # the previous holder removed this file as we locked it: retry
            continue
        break
    try:
        _write_holder(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # Windows refuses while the file is open: it stays, unlocked
        os.close(fd)  # closing the descriptor drops the lock


def _write_holder(fd: int) -> None:
    # lseek + write rather than pwrite, which Windows lacks.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
