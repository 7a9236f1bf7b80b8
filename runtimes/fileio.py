"""File IO that never loses or half-writes a user's files.

Every writer in the package goes through this module:

* `sha256_file` / `sha256_path` / `path_size`: hashes and sizes of files and directory trees
  (a Core ML ``.mlpackage`` is a tree); symlinks are never followed, so a tree's hash covers
  what it holds, not what it points at.
* `atomic_write_bytes` / `atomic_write_text` / `atomic_open`: write a temporary file beside the
  target, flush, fsync, rename over the target, fsync the directory. A crash leaves the old file
  or the new one. Files get the permissions ``open()`` would give them under the process umask
  (0644 under umask 022), not the private 0600 of ``tempfile``.
* `staging_dir` / `swap_directory`: build a directory completely beside its target, then swap it
  in by one rename (``renameat2(RENAME_EXCHANGE)`` on Linux), so the target path holds the old
  complete directory or the new one at every instant. Staging directories carry an flock while
  their writer lives; `clean_stale` removes the ones whose writer died.
* `lock`: an fcntl lock that serialises the writers of one directory (a bundle, a checkpoint).
  A second writer waits up to a timeout, then fails with a message naming the directory.

Only the standard library: ``runtimes`` stays importable without torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from runtimes.errors import DecoError

__all__ = [
    "LOCK_TIMEOUT_ENV",
    "LockTimeout",
    "StagingDir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale",
    "copy_tree_into",
    "default_dir_mode",
    "default_file_mode",
    "describe_os_error",
    "fsync_dir",
    "fsync_file",
    "lock",
    "lock_path",
    "path_size",
    "sha256_file",
    "sha256_path",
    "staging_dir",
    "swap_directory",
    "tree_files",
]

LOCK_TIMEOUT_ENV = "DECO_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0  # seconds; a large export's commit can take a while on a slow disk
STAGING_KINDS = ("staging", "old", "tmp")


class LockTimeout(DecoError, TimeoutError):
    """Another process holds the write lock of a directory for longer than the timeout.

    Also a TimeoutError, for callers that wait on other things too.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "timed out waiting for a write lock"


# ---------------------------------------------------------------------------------------------
# Hashes and sizes


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bundles hold multi-GB graphs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_files(path: str | os.PathLike[str]) -> list[Path]:
    """Regular files under ``path``, sorted, without following symlinks (a symlinked member
    is neither hashed nor sized: `runtimes.bundle.verify` refuses it by name)."""
    root = Path(path)
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        dirnames.sort()
        out.extend(base / f for f in filenames if not (base / f).is_symlink()
                   and (base / f).is_file())
    return sorted(out)


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a directory tree (e.g. ``.mlpackage``): the hash of the sorted
    lines "relative/path<TAB>sha256-of-file", so any changed, added or removed member shows."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(path))
    lines = [f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}" for p in tree_files(path)]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def path_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a file, or the summed size of the files under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in tree_files(path))


# ---------------------------------------------------------------------------------------------
# Permissions


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (process-wide, but the
    # window is two syscalls and the value is unchanged).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0o666 minus the umask: what ``open(path, "w")`` creates (0644 under umask 022)."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """0o777 minus the umask: what ``mkdir`` creates (0755 under umask 022)."""
    return 0o777 & ~_umask()


# ---------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename inside it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not every filesystem lets a directory be opened; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and /proc-like mounts) refuse fsync on directories
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str], fix_mode: bool = True) -> None:
    """fsync a file written by another library (safetensors, onnx, numpy), and give it the
    umask's permissions where that library made it private (safetensors writes 0600)."""
    if fix_mode:
        os.chmod(path, default_file_mode())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb",
                encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit flush, fsync and
    rename it over ``path`` (then fsync the directory). On an exception the temporary file is
    removed and ``path`` is untouched.

    As ``open()`` would: a symlink at ``path`` is written through (its target is replaced, the
    link stays), and an existing file keeps its permissions (a private 0600 file stays 0600)."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes files; mode {mode!r} must contain 'w'")
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep_mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        keep_mode = None
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    except OSError as err:  # name the user's path, not the temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            if keep_mode is not None:
                os.fchmod(fh.fileno(), keep_mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # A failed write (a full disk) names no file; the user's path is the one to name.
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see `atomic_open`)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Staged directories


def _staging_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


class StagingDir:
    """A directory beside ``target`` (same filesystem, so it can be renamed onto it), created
    under the umask and flock'ed while this object lives, so `clean_stale` never removes a
    directory a live writer is filling."""

    def __init__(self, target: str | os.PathLike[str], kind: str = "staging") -> None:
        if kind not in STAGING_KINDS:
            raise ValueError(f"kind must be one of {STAGING_KINDS}")
        self.target = Path(os.path.abspath(target))
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(target)) from None
        prefix = _staging_prefix(self.target, kind)
        while True:
            path = self.target.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(path)  # 0o777 minus the umask, unlike tempfile.mkdtemp's 0o700
                break
            except FileExistsError:
                continue
            except OSError as err:  # name the user's target, not the staging name
                raise OSError(err.errno, err.strerror, str(target)) from None
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        """Drop the flock (the directory itself stays; see `remove`)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Delete the staging directory (whatever it holds now) and drop the flock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

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
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
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


_renameat2 = _libc() if os.uname().sysname == "Linux" else None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the OS or filesystem cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
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
    renames through a flock'ed ``.old-`` sibling where the filesystem lacks the exchange)."""
    staged, target = Path(os.path.abspath(staged)), Path(os.path.abspath(target))
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


_OS_FIXES = {
    errno.EROFS: "the filesystem is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a location you can write, or fix its permissions",
    errno.EPERM: "not permitted: choose a location you can write, or fix its permissions",
    errno.ENOSPC: "the disk is full: free space or choose another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another disk",
    errno.EBUSY: "it is busy (a mount point, or in use): choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.EISDIR: "it is a directory: give a file name",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EXDEV: "it is on another filesystem: choose a path on the same disk",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the path, what went wrong and the fix."""
    where = err.filename if err.filename is not None else "(no path)"
    fix = _OS_FIXES.get(err.errno or -1)
    what = err.strerror or str(err)
    if fix is None:
        return f"{where}: {what}"
    return f"{where}: {fix}" if fix.lower().startswith(what.lower()) else f"{where}: {what}; {fix}"


# ---------------------------------------------------------------------------------------------
# Locks


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
    then raises `LockTimeout`. The lock is an ``flock`` on ``.NAME.lock`` beside ``target``:
    the kernel drops it when its holder exits, however it exits. The holder removes the file
    when it is done; a waiter that then locks the removed file notices (its inode is no longer
    the path's) and locks the new one, so no lock file is left behind and no two writers ever
    hold "the" lock at once."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = _timeout(timeout)
    deadline = time.monotonic() + limit
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)  # the previous holder removed this file as we locked it: retry
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing the descriptor drops the flock


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
