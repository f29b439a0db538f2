"""The one exception type the CLI turns into a one-line error (no traceback, exit code 2), and
the one-line form of the resource errors (full disk, read-only, denied, a path under a file)."""

from __future__ import annotations

import errno

RESOURCE_FIXES = {
    errno.EROFS: "the file system is read-only: write to a writable disk",
    errno.EACCES: "permission denied: write somewhere you may write",
    errno.EPERM: "permission denied: write somewhere you may write",
    errno.ENOSPC: "no space left on the device: free some space (or use another disk), then rerun the same command to resume",
    errno.EDQUOT: "disk quota exceeded: free some space (or use another disk), then rerun the same command to resume",
    errno.ENOTDIR: "a part of the path is a file, not a directory: pass a path whose parents are directories",
}


class UserError(Exception):
    """Bad input or configuration. The message names the problem and the fix, in one line."""


def resource_errno(e: BaseException) -> int | None:
    """The errno of a resource error, or None for other errors. Libraries that wrap the OS error
    (pyarrow's IOErrors, safetensors' SafetensorError) may carry it only in the message."""
    if isinstance(e, OSError) and e.errno in RESOURCE_FIXES:
        return e.errno
    text = str(e)
    return next((n for n, word in ((errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system"),
                                   (errno.EDQUOT, "Disk quota exceeded")) if word in text), None)


def resource_error(e: BaseException, path: object = None, doing: str = "write") -> UserError | None:
    """A one-line UserError naming the path for a resource OSError, or None for other errors."""
    n = resource_errno(e)
    if n is None:
        return None
    where = path if path is not None else (getattr(e, "filename", None) or "the output")
    return UserError(f"cannot {doing} {where}: {RESOURCE_FIXES[n]}")
