"""Writers' machinery: build a directory completely beside its target, then swap it in.

`staging_dir` makes a directory beside the target (same filesystem, so it can be renamed onto
it) and holds an OS lock on it while its writer lives; `swap_directory` puts it at the target by
one rename (``renameat2(RENAME_EXCHANGE)`` on Linux), so the target path holds the old complete
directory or the new one at every instant; `clean_stale` removes the staging directories whose
writer died; `copy_tree_into` completes a staging directory with an existing one's other files.
The write lock that serialises writers is `runtimes.locks.lock`. Readers import none of this.

Where a directory cannot be opened to lock it (Windows), a staging directory carries no lock
and `clean_stale` leaves it alone: a live writer's files are never removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import secrets
import shutil
import sys
import weakref
from pathlib import Path
from typing import Any

from runtimes.fileio import fsync_dir
from runtimes.interrupts import interrupts_deferred, raise_if_interrupted
from runtimes.locks import still_names, try_lock_descriptor

__all__ = ["STAGING_KINDS", "StagingDir", "clean_stale", "copy_tree_into", "staging_dir",
           "swap_directory"]

STAGING_KINDS = ("staging", "old", "tmp")


_TAKEN = -1  # `_hold`'s answer when a cleaner took the directory first


def _hold(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its OS lock; None where directories cannot be
    opened or locked (the directory is then simply not marked live); `_TAKEN` when another
    process's `clean_stale` locked or removed it between its creation and this lock (it
    removes what it locks, so the caller makes another)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _TAKEN
    except OSError:
        return None
    try:
        locked = try_lock_descriptor(fd)
    except OSError:
        os.close(fd)
        return None
    if locked and still_names(path, fd):  # a cleaner may have removed it after our open
        return fd
    os.close(fd)
    return _TAKEN


def _staging_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def _discard(path: Path, held: list[int], owner: int) -> None:
    """Remove a staging directory and drop its flock: `StagingDir.remove`, and its finalizer.
    A forked child's copy of the object owns neither."""
    if os.getpid() != owner:
        return
    shutil.rmtree(path, ignore_errors=True)
    _unlock(held)


def _unlock(held: list[int]) -> None:
    """Close the descriptors that hold a staging directory's flock (each once)."""
    while held:
        os.close(held.pop())


class StagingDir:
    """A directory beside ``target`` (same filesystem, so it can be renamed onto it), created
    under the umask and flock'ed while this object lives, so `clean_stale` never removes a
    directory a live writer is filling.

    The directory lives no longer than this object: if the object is dropped before its owner
    could remove it (an interrupt between the construction and the ``with`` that would have
    removed it), its finalizer does, at the latest when the interpreter exits. Under `deco`'s
    `interrupts_raise` a signal during the construction waits until that finalizer exists."""

    def __init__(self, target: str | os.PathLike[str], kind: str = "staging") -> None:
        if kind not in STAGING_KINDS:
            raise ValueError(f"kind must be one of {STAGING_KINDS}")
        self.target = Path(os.path.abspath(target))
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(target)) from None
        prefix = _staging_prefix(self.target, kind)
        with interrupts_deferred():
            path, fd = self._make(prefix, target)
            self.path = path
            self._held = [] if fd is None else [fd]
            self._finalizer = weakref.finalize(self, _discard, path, self._held, os.getpid())

    def _make(self, prefix: str, target: str | os.PathLike[str]) -> tuple[Path, int | None]:
        while True:
            path = self.target.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(path)  # 0o777 minus the umask, unlike tempfile.mkdtemp's 0o700
            except FileExistsError:
                continue
            except OSError as err:  # name the user's target, not the staging name
                raise OSError(err.errno, err.strerror, str(target)) from None
            # Until it is locked, another writer's `clean_stale` takes the new directory for
            # a dead writer's: when it did, make another.
            try:
                fd = _hold(path)
            except BaseException:  # an interrupt (Ctrl-C, SIGTERM) too: nothing is left behind
                shutil.rmtree(path, ignore_errors=True)
                raise
            if fd != _TAKEN:
                return path, fd

    def release(self) -> None:
        """Drop the flock (the directory itself stays until `remove` or this object's end)."""
        _unlock(self._held)

    def remove(self) -> None:
        """Delete the staging directory (whatever it holds now) and drop the flock."""
        self._finalizer()

    def __enter__(self) -> StagingDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def staging_dir(target: str | os.PathLike[str], kind: str = "staging") -> StagingDir:
    """A new `StagingDir` beside ``target``."""
    return StagingDir(target, kind)


def clean_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging / old / temporary directories beside ``target`` whose writer is gone
    (nobody holds their flock); return what was removed. Live writers' directories stay."""
    target = Path(os.path.abspath(target))
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefixes = tuple(_staging_prefix(target, k) for k in STAGING_KINDS)
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefixes) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue  # cannot be probed (Windows opens no directory): treat it as live
        try:
            locked = try_lock_descriptor(fd)
        except OSError:
            locked = False
        if not locked:
            os.close(fd)
            continue  # a live writer holds it
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        fn = lib.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _renameat2() -> Any:
    return _libc() if sys.platform.startswith("linux") else None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the OS or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_directory(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the complete directory ``staged`` at ``target``; the old ``target`` (if any) is
    deleted afterwards. ``target`` holds the old directory or the new one at every instant:
    one ``rename`` when it is absent, one ``renameat2(RENAME_EXCHANGE)`` when it exists (two
    renames through a flock'ed ``.old-`` sibling where the filesystem lacks the exchange). An
    interrupt that arrived meanwhile stops it before the first (`runtimes.interrupts`)."""
    staged, target = Path(os.path.abspath(staged)), Path(os.path.abspath(target))
    raise_if_interrupted()
    fsync_dir(staged)
    if not os.path.lexists(target):
        os.rename(staged, target)
        fsync_dir(target.parent)
        return
    if target.is_symlink() or not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
    if _exchange(staged, target):
        fsync_dir(target.parent)
        shutil.rmtree(staged, ignore_errors=True)  # now the old directory
        return
    old = StagingDir(target, "old")
    os.rmdir(old.path)
    try:
        os.rename(target, old.path)
        os.rename(staged, target)
    except BaseException:
        if not os.path.lexists(target) and old.path.exists():
            os.rename(old.path, target)
        old.release()
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old.path, ignore_errors=True)
    old.release()


def copy_tree_into(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                   skip: set[str] | None = None) -> list[str]:
    """Copy every entry of ``src`` into ``dst`` where ``dst`` has no entry of that relative path
    yet (hard links where possible: bundle files are never modified in place). ``skip`` names
    relative paths not to copy. Returns the relative paths copied."""
    src, dst = Path(src), Path(dst)
    skip = skip or set()
    copied: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        base = Path(dirpath)
        rel_dir = base.relative_to(src)
        (dst / rel_dir).mkdir(parents=True, exist_ok=True)
        for name in [*filenames, *(d for d in dirnames if (base / d).is_symlink())]:
            rel = (rel_dir / name).as_posix()
            s, d = base / name, dst / rel_dir / name
            if rel in skip or os.path.lexists(d):
                continue
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
            else:
                try:
                    os.link(s, d)
                except OSError:
                    shutil.copy2(s, d)
            copied.append(rel)
    return copied
