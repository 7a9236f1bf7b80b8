"""How a user error reads on one line: what the command-line front ends (`deco`, the training
verbs) and the bench's failed rows print. An OSError gets the path, what went wrong and the fix
(`describe_os_error`); a library caller gets the exception itself. No click here, so the bench
worker shares it.
"""

from __future__ import annotations

import errno

__all__ = ["describe_os_error", "one_line"]


def one_line(err: BaseException) -> str:
    """The message of a user error on one line (a KeyError's key without its quotes)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename is not None:
        message = describe_os_error(err)  # the path, what went wrong and the fix
    return " ".join(str(message).split()) or type(err).__name__


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
