"""File IO that never loses or half-writes a user's files: what readers and single-file
writers need.

* `sha256_file` / `sha256_path` / `path_size`: hashes and sizes of files and directory trees
  (a Core ML ``.mlpackage`` is a tree); symlinks are never followed, so a tree's hash covers
  what it holds, not what it points at.
* `atomic_write_bytes` / `atomic_write_text` / `atomic_open`: write a temporary file beside the
  target, flush, fsync, rename over the target, fsync the directory. A crash leaves the old file
  or the new one. Files get the permissions ``open()`` would give them under the process umask
  (0644 under umask 022), not the private 0600 of ``tempfile``. An interrupt that arrived
  meanwhile stops the rename (`runtimes.interrupts`).

The writers of whole directories (a bundle, a checkpoint) use `runtimes.staging` (staged
directories, the swap, stale clean-up) and `runtimes.locks` (the write lock); the names they
had here still import from here, loaded on first use. Only the standard library and no
platform module: ``runtimes`` imports on every OS, without torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from runtimes.interrupts import raise_if_interrupted

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "default_file_mode",
    "fsync_dir",
    "fsync_file",
    "path_size",
    "sha256_file",
    "sha256_path",
    "tree_files",
]

# Writers' names that lived here before the split, resolved on first use (PEP 562), so a
# reader that imports this module loads neither the lock nor the staging machinery.
_MOVED = {
    "LOCK_TIMEOUT_ENV": "runtimes.locks",
    "DEFAULT_LOCK_TIMEOUT": "runtimes.locks",
    "LockTimeout": "runtimes.locks",
    "lock": "runtimes.locks",
    "lock_path": "runtimes.locks",
    "STAGING_KINDS": "runtimes.staging",
    "StagingDir": "runtimes.staging",
    "staging_dir": "runtimes.staging",
    "clean_stale": "runtimes.staging",
    "swap_directory": "runtimes.staging",
    "copy_tree_into": "runtimes.staging",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
        raise_if_interrupted()
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
