"""gRPC status on the wire: reading an upstream's answer, writing the relay's own.

The relay answers some calls itself (refusals, malformed calls, timeouts, overflows) and
forwards the others' statuses; the front servers (TLS door, h2 front) answer in the same
shape. The status codes, ``grpc-message`` percent-encoding and the HTTP status mapping
are gRPC over HTTP/2's ("Responses"), written once here.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

import grpc

from mesh.proxy.hpack_codec import Header

#: Envoy's mark on a call a circuit breaker shed (its 503 overflow carries it too).
OVERLOADED_TEXT = ("x-envoy-overloaded", "true")
OVERLOADED: Header = (b"x-envoy-overloaded", b"true")
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
#: gRPC's mapping of HTTP statuses when a response carries no grpc-status.
_HTTP_STATUS = {
    b"400": grpc.StatusCode.INTERNAL,
    b"401": grpc.StatusCode.UNAUTHENTICATED,
    b"403": grpc.StatusCode.PERMISSION_DENIED,
    b"404": grpc.StatusCode.UNIMPLEMENTED,
    b"429": grpc.StatusCode.UNAVAILABLE,
    b"502": grpc.StatusCode.UNAVAILABLE,
    b"503": grpc.StatusCode.UNAVAILABLE,
    b"504": grpc.StatusCode.UNAVAILABLE,
}


def status_of(headers: Iterable[Header]) -> grpc.StatusCode:
    """The gRPC status a response's trailers (or trailers-only headers) carry."""
    http = b"200"
    for name, value in headers:
        if name == b"grpc-status":
            try:
                return _STATUS_BY_NUMBER.get(int(value), grpc.StatusCode.UNKNOWN)
            except ValueError:
                return grpc.StatusCode.UNKNOWN
        if name == b":status":
            http = value
    return _HTTP_STATUS.get(http, grpc.StatusCode.UNKNOWN)


def message_of(headers: Iterable[Header]) -> str | None:
    """The (percent-decoded) ``grpc-message`` of a response's trailers, if any."""
    for name, value in headers:
        if name == b"grpc-message":
            return unquote(value.decode("latin-1"))
    return None


def error_headers(code: grpc.StatusCode, message: str, *, trailers_only: bool) -> list[Header]:
    # grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
    status = [
        (b"grpc-status", str(code.value[0]).encode()),
        (b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()),
    ]
    if trailers_only:
        return [(b":status", b"200"), (b"content-type", b"application/grpc"), *status]
    return status
