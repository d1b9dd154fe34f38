"""What a job's client is told when the worker fails it: the kind of failure, never the
server's file paths (the worker's log keeps the exception with its detail)."""

from __future__ import annotations

import errno
import os

from mesh.errors import MeshError
from workers.model_repo import RepositoryError

#: Failures a file system gives, said so that the operator knows what to fix.
_OS_KINDS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENAMETOOLONG: "a file name is too long for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file stands where a directory belongs",
    errno.EISDIR: "a directory stands where a file belongs",
    errno.ENOENT: "a file or directory is missing",
    errno.EIO: "an I/O error",
}


def os_failure(exc: OSError) -> str:
    """The kind of ``exc``, without the paths its ``str`` carries."""
    if exc.errno in _OS_KINDS:
        return _OS_KINDS[exc.errno]
    if exc.errno is not None:
        # strerror names the kind alone; str(exc) appends the file names.
        return os.strerror(exc.errno)
    return type(exc).__name__


def publication_failure(model: str, exc: OSError | RepositoryError) -> str:
    """Why publishing ``model`` into the model repository failed."""
    kind = os_failure(exc) if isinstance(exc, OSError) else "its folder does not follow the layout"
    return f"publishing model {model!r} into the model repository failed: {kind}"


def job_failure(exc: BaseException) -> str:
    """What the client of a job the worker failed on ``exc`` reads."""
    if isinstance(exc, MeshError):  # written for clients (see mesh.errors)
        return exc.message
    if isinstance(exc, OSError):
        return f"the training worker's storage failed: {os_failure(exc)}"
    return f"internal error in the training worker ({type(exc).__name__}); its log has the detail"
