"""Domain errors, each carrying the gRPC status it maps to."""

from __future__ import annotations

import grpc

#: The most of a status message sent (UTF-8 bytes). grpc-message travels in the trailers'
#: header block, which peers cap (grpc-core's metadata limit is 8 KiB by default, the
#: relay's header list 64 KiB, percent-encoding triples non-ASCII bytes): an error quoting
#: a client's 4 MB value failed its call UNAVAILABLE instead of with its own status.
MAX_MESSAGE_BYTES = 2048


def clamp_message(message: str) -> str:
    """``message``, cut to at most MAX_MESSAGE_BYTES of UTF-8, saying how much was cut."""
    data = message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    kept = data[: MAX_MESSAGE_BYTES - 32].decode(errors="ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} bytes cut)"


class MeshError(Exception):
    """Base of every error a servicer may raise on purpose.

    Domain code raises these; the one interceptor in ``mesh.server.interceptor``
    turns them into gRPC statuses, so no servicer calls ``context.abort`` itself.
    The message is sent to the client as is: it must name the problem and must
    not leak internals.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        #: Trailing metadata sent with the status (e.g. ``grpc-retry-pushback-ms``).
        self.trailers = trailers


class InvalidArgument(MeshError):
    """The request is malformed; retrying it unchanged cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MeshError):
    """A named thing (dataset, model, job) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MeshError):
    """Creating something whose identity is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MeshError):
    """The system is not in a state where the request can run."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MeshError):
    """A concurrent change won (optimistic concurrency conflict)."""

    code = grpc.StatusCode.ABORTED


class Unavailable(MeshError):
    """Transiently unable to serve (not ready, no endpoint, store down)."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(MeshError):
    """A quota, size limit or rate limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(MeshError):
    """Stored data is corrupt (checksum mismatch, truncated file)."""

    code = grpc.StatusCode.DATA_LOSS


class PermissionDenied(MeshError):
    """The caller is known but not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(MeshError):
    """The caller could not be identified."""

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(MeshError):
    """The request's deadline passed while waiting."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MeshError):
    """The operation was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unimplemented(MeshError):
    """The method or feature is not offered here."""

    code = grpc.StatusCode.UNIMPLEMENTED
