"""Is this a well-formed gRPC call? Judged by the proxy before any upstream sees it.

A proxy that forwards a malformed call lets the upstream answer it, and that answer
(UNAVAILABLE, INTERNAL, or none at all) then counts as the upstream's error: a client
could eject healthy workers through outlier detection just by sending bad calls. What
the proxy can judge from the request alone it answers itself, with the status a gRPC
server would give, so only errors an upstream produced feed outlier detection.

Statuses (from what grpc-core's server and Envoy answer; where they differ, noted):

- ``:method`` other than POST, ``content-type`` not ``application/grpc[+proto|;...]``:
  UNIMPLEMENTED, "the gateway serves gRPC only". (grpc-go and grpc-java answer HTTP
  405/415, which a gRPC client reads as UNKNOWN; Envoy forwards whatever comes. A
  trailers-only gRPC status tells a gRPC client what went wrong.)
- missing or wrong ``te: trailers``, ``:scheme`` not http/https, missing ``:path``:
  INTERNAL. (grpc-core answers these "malformed request" with UNKNOWN; INTERNAL is what
  grpc-java and grpc-go give a request that breaks the protocol, and the code gRPC's
  own status table reserves for "something very broken".)
- ``:path`` not ``/Service/Method``: UNIMPLEMENTED, as every gRPC server answers a method
  it does not have.
- a header name gRPC metadata cannot have (upper case, empty, outside ``0-9 a-z _ - .``),
  a connection-specific header, or a pseudo-header that is unknown or repeated (RFC 9113
  §8.2.1, §8.2.2, §8.3: a malformed request): INTERNAL, as grpc-core answers ("Illegal
  header key"). Forwarded, the upstream's INTERNAL counted against it.
- a ``grpc-timeout`` that is not at most 8 digits and a unit: INTERNAL, as grpc-core and
  grpc-go answer (ignored, the call would run with no deadline at all).
- a message with the compressed flag and no ``grpc-encoding`` (or ``identity``):
  INTERNAL, as grpc-core does; an encoding the mesh's servers do not offer:
  UNIMPLEMENTED with ``grpc-accept-encoding`` (gRPC's compression spec).
- END_STREAM with no message on a unary or server-streaming method: INTERNAL, as
  grpc-java ("Half-closed without a request") and grpc-go do (grpc-core's servers just
  never answer: the upstream would hold the call until its deadline).

Pure: headers and bytes in, a :class:`Rejection` or None out; table-tested.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from mesh.routing.callpolicy import parse_timeout

Header = tuple[bytes, bytes]

#: Encodings every gRPC server in the mesh (grpc-core, Python) decodes.
ENCODINGS: frozenset[bytes] = frozenset({b"identity", b"gzip", b"deflate"})
#: The length prefix of every gRPC message: 1 flag byte, 4 bytes of length.
PREFIX = 5


@dataclass(frozen=True)
class Rejection:
    """The proxy's own answer to a malformed call (never an upstream's error)."""

    code: grpc.StatusCode
    message: str
    #: Extra response headers (``grpc-accept-encoding`` for an unsupported encoding).
    headers: tuple[Header, ...] = ()


#: The pseudo-headers a request may carry (RFC 9113 §8.3.1; ``:protocol`` needs extended
#: CONNECT, which the relay does not offer).
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
#: RFC 9113 §8.2.2: headers of HTTP/1.1 connections, malformed in an HTTP/2 request.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: gRPC's Header-Name characters ("0-9 a-z _ - ."): what every gRPC server accepts.
_NAME_CHARS = b"0123456789abcdefghijklmnopqrstuvwxyz_-."


def _malformed(message: str) -> Rejection:
    return Rejection(grpc.StatusCode.INTERNAL, message)


def _check_name(name: bytes) -> Rejection | None:
    """A regular header's name judged as gRPC metadata and HTTP/2 require."""
    if not name or name.translate(None, _NAME_CHARS):
        return _malformed(
            f"malformed header name {name.decode('latin-1')!r} "
            "(gRPC metadata names are lower case: 0-9 a-z _ - .)"
        )
    if name in _CONNECTION_SPECIFIC:
        return _malformed(
            f"connection-specific header {name.decode('latin-1')!r} is not allowed in HTTP/2"
        )
    return None


def _is_grpc_content_type(value: bytes) -> bool:
    # gRPC over HTTP/2: "application/grpc" [("+proto" / "+json" / {custom})], and
    # parameters after ";" are allowed.
    if not value.startswith(b"application/grpc"):
        return False
    rest = value[len(b"application/grpc") :]
    return rest == b"" or rest[:1] in (b"+", b";")


_GOOD = Rejection(grpc.StatusCode.OK, "")
#: :func:`_check_name` by name (``_GOOD``: fine): every call asks it of the same names.
_checked_names: dict[bytes, Rejection] = {}


def check_headers(headers: Iterable[Header]) -> Rejection | None:
    """The request's header block judged as gRPC over HTTP/2 requires."""
    method = scheme = path = content_type = te = None
    pseudo: set[bytes] = set()
    for name, value in headers:
        if name[:1] == b":":
            if name not in _REQUEST_PSEUDO or name in pseudo:
                problem = "duplicate" if name in pseudo else "unknown"
                return _malformed(f"{problem} pseudo-header {name.decode('latin-1')!r}")
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":scheme":
                scheme = value
            elif name == b":path":
                path = value
            continue
        bad = _checked_names.get(name)
        if bad is None:
            bad = _check_name(name) or _GOOD
            if len(_checked_names) < 4096:  # names are the caller's: bounded
                _checked_names[name] = bad
        if bad is not _GOOD:
            return bad
        if name == b"content-type":
            content_type = value
        elif name == b"te":
            te = value
        elif name == b"grpc-timeout" and parse_timeout(value) is None:
            return _malformed(
                f"malformed grpc-timeout {value.decode('latin-1')!r} "
                "(want at most 8 digits and a unit: H M S m u n)"
            )
    if method != b"POST" or content_type is None or not _is_grpc_content_type(content_type):
        got = f"{(method or b'').decode('latin-1')} {(content_type or b'').decode('latin-1')!r}"
        return Rejection(grpc.StatusCode.UNIMPLEMENTED, f"the gateway serves gRPC only (got {got})")
    if te != b"trailers":
        detail = "missing" if te is None else f"{te.decode('latin-1')!r}"
        return Rejection(
            grpc.StatusCode.INTERNAL, f"a gRPC request must send 'te: trailers' ({detail})"
        )
    if scheme not in (b"http", b"https"):
        detail = "missing" if scheme is None else f"{scheme.decode('latin-1')!r}"
        return Rejection(grpc.StatusCode.INTERNAL, f"bad :scheme ({detail})")
    if path is None or not path:
        return Rejection(grpc.StatusCode.INTERNAL, "missing :path")
    parts = path[1:].split(b"/") if path[:1] == b"/" else []
    if len(parts) != 2 or not all(parts):
        return Rejection(
            grpc.StatusCode.UNIMPLEMENTED,
            f"malformed method path {path.decode('latin-1')!r} (want /package.Service/Method)",
        )
    return None


def encoding_of(headers: Iterable[Header]) -> bytes | None:
    for name, value in headers:
        if name == b"grpc-encoding":
            return value
    return None


def check_compressed(encoding: bytes | None) -> Rejection | None:
    """A message arrived with the compressed flag: is ``encoding`` one to decode it with?"""
    if encoding is None or encoding == b"identity":
        return Rejection(
            grpc.StatusCode.INTERNAL,
            "a compressed message but no grpc-encoding"
            if encoding is None
            else "a compressed message with grpc-encoding identity",
        )
    if encoding not in ENCODINGS:
        offered = b",".join(sorted(ENCODINGS))
        return Rejection(
            grpc.StatusCode.UNIMPLEMENTED,
            f"grpc-encoding {encoding.decode('latin-1')!r} is not supported",
            ((b"grpc-accept-encoding", offered),),
        )
    return None


def check_end(messages: int, *, client_streaming: bool | None) -> Rejection | None:
    """The client ended its request after ``messages`` complete messages. Unary and
    server-streaming methods take exactly one request message; unknown methods
    (``client_streaming`` None) are not judged."""
    if client_streaming is None or client_streaming:
        return None
    if messages == 0:
        return Rejection(
            grpc.StatusCode.INTERNAL,
            "the request ended without a message (half-closed without a request)",
        )
    return None


class MessageFramer:
    """Follows message boundaries in a request body (fed as it arrives, in any
    fragments) to check each message's compressed flag. Keeps at most 5 bytes; costs a
    few integer operations per DATA frame."""

    __slots__ = ("_head", "_left", "encoding", "messages")

    def __init__(self, encoding: bytes | None) -> None:
        self.encoding = encoding
        #: Complete messages seen.
        self.messages = 0
        #: Bytes of the current message's body still to come (0: at a prefix).
        self._left = 0
        self._head = b""

    @property
    def partial(self) -> bool:
        """Whether the body so far ends inside a message (or its prefix)."""
        return self._left > 0 or bool(self._head)

    def feed(self, data: bytes) -> Rejection | None:
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                self._left -= step
                pos += step
                if not self._left:
                    self.messages += 1
                continue
            need = PREFIX - len(self._head)
            head = self._head + data[pos : pos + need]
            pos += len(head) - len(self._head)
            if len(head) < PREFIX:
                self._head = head
                break
            self._head = b""
            if head[0] & 1:
                rejected = check_compressed(self.encoding)
                if rejected is not None:
                    return rejected
            self._left = int.from_bytes(head[1:5], "big")
            if not self._left:
                self.messages += 1
        return None
