"""A TLS listener's door: TLS clients go on to the relay, plaintext ones are told why not.

A sidecar's mesh port speaks mutual TLS only. A plaintext gRPC client (``grpcurl
-plaintext``, an insecure channel) that dials it used to wait out its own deadline: the TLS
layer dropped the connection, the client redialled, and all it ever said was "context
deadline exceeded". The first byte tells the two apart (a TLS record starts 0x16, the
HTTP/2 preface "PRI"), so the listener reads it first: TLS goes through the standard
library's TLS protocol to the relay's connection as before; the HTTP/2 preface in clear
gets a minimal HTTP/2 answer, every call UNAUTHENTICATED with a message that names what is
required, then GOAWAY and close, so the client fails at once and says why. Anything else
(HTTP/1.1, garbage) gets one line of text and is closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import cast

import grpc

from mesh.proxy import frames as f
from mesh.proxy.grpc_status import error_headers
from mesh.proxy.hpack_codec import HeaderEncoder
from mesh.routing.limits import SourceLimiter, source_of

log = logging.getLogger(__name__)

#: The first byte of a TLS record carrying a handshake (RFC 8446 §5.1): a ClientHello.
TLS_HANDSHAKE = 0x16
#: How long a connection may stay silent before the door closes it (a TLS client speaks
#: first; the relay's own timeouts apply once the connection is handed over).
FIRST_BYTES_TIMEOUT_S = 10.0
#: The most a refused client may send before it is cut off.
MAX_REFUSED_INPUT = 64 * 1024
#: How long a refused client has to read its answer before the connection closes (closing
#: at once, with its request still unread here, could reset the answer away).
LINGER_S = 1.0


def refusal_message(tls: ssl.SSLContext) -> str:
    """What a plaintext client is told: mutual TLS when client certificates are required."""
    if tls.verify_mode == ssl.CERT_REQUIRED:
        return (
            "this port requires mutual TLS (mTLS): connect with TLS and a client certificate "
            "of the mesh CA (e.g. grpcurl -cacert ca.pem -cert cert.pem -key key.pem), "
            "not in plaintext"
        )
    return "this port requires TLS: connect with TLS, not in plaintext"


class TlsDoor(asyncio.Protocol):
    """Decides, on a connection's first bytes, between the TLS path and a refusal.

    Until its handshake ends a connection is the door's: counted against its source's
    limit (``limiter``), closed if the handshake takes longer than ``handshake_timeout``
    (None: the standard library's 60 s), and held in ``at_door`` so that its owner can
    close it when it stops.
    """

    def __init__(
        self,
        app_protocol: Callable[[], asyncio.Protocol],
        tls: ssl.SSLContext,
        at_door: set[asyncio.Transport],
        limiter: SourceLimiter | None = None,
        *,
        handshake_timeout: float | None = None,
    ) -> None:
        self._app_protocol = app_protocol
        #: The listener's connections not handed to the relay (handshaking or refused),
        #: open until they close: its owner closes what is left when it stops.
        self._at_door = at_door
        self._limiter = limiter
        self._handshake_timeout = handshake_timeout
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        #: The source counted against the limiter, until released.
        self._source: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: _Refusal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports implement asyncio.Transport
        # without inheriting from it (see Connection.connection_made).
        self._transport = cast(asyncio.Transport, transport)
        if self._limiter is not None:
            source = source_of(transport.get_extra_info("peername"))
            refused = self._limiter.admit_handshake(source)
            if refused is not None:
                # No TLS session to say why in: closed at once, costing nothing held.
                log.info("refusing a connection at the TLS door: %s", refused)
                self._transport.abort()
                return
            self._source = source
        self._at_door.add(self._transport)
        self._timer = asyncio.get_running_loop().call_later(FIRST_BYTES_TIMEOUT_S, transport.close)

    def _release(self) -> None:
        if self._source is not None and self._limiter is not None:
            self._limiter.release_handshake(self._source)
        self._source = None

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            return
        if self._refusal is not None:
            self._refusal.feed(data)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if data[0] == TLS_HANDSHAKE:
            self._hand_over(transport, data)
        else:
            self._refusal = _Refusal(transport, refusal_message(self._tls))
            self._refusal.feed(data)

    def _handshake_ended(self, transport: asyncio.Transport, done: asyncio.Future[None]) -> None:
        # Done, failed, timed out or closed: the connection is the relay's (or gone).
        self._at_door.discard(transport)
        self._release()
        # A failed handshake is the client's problem (the TLS layer logs it and closes),
        # so its exception is only taken off the future.
        if not done.cancelled():
            done.exception()

    def _hand_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """From here the standard library's TLS protocol owns the connection, exactly as
        with ``create_server(ssl=...)``; the bytes already read are fed to it first."""
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()
        handshake.add_done_callback(lambda done: self._handshake_ended(transport, done))
        tls_protocol = sslproto.SSLProtocol(
            loop,
            self._app_protocol(),
            self._tls,
            handshake,
            server_side=True,
            # Whole seconds, as the standard library's signature has it.
            ssl_handshake_timeout=(
                None if self._handshake_timeout is None else math.ceil(self._handshake_timeout)
            ),
        )
        transport.set_protocol(tls_protocol)
        tls_protocol.connection_made(transport)
        view = memoryview(data)
        while view:
            buffer = tls_protocol.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            tls_protocol.buffer_updated(n)
            view = view[n:]

    def connection_lost(self, exc: Exception | None) -> None:
        # Only before a hand-over: after it, the TLS protocol is told instead.
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._at_door.discard(self._transport)
        self._release()


class _Refusal:
    """A plaintext client: every HTTP/2 call answered UNAUTHENTICATED, then GOAWAY."""

    def __init__(self, transport: asyncio.Transport, message: str) -> None:
        self._transport = transport
        self._message = message
        self._input = bytearray()
        self._started = False
        self._encoder = HeaderEncoder()
        self._closing = False

    def feed(self, data: bytes) -> None:
        self._input += data
        if len(self._input) > MAX_REFUSED_INPUT:
            self._transport.close()
            return
        if not self._started:
            if len(self._input) < len(f.PREFACE) and f.PREFACE.startswith(self._input):
                return  # the rest of the preface is on its way
            if not self._input.startswith(f.PREFACE):
                # Not HTTP/2 (HTTP/1.1, a port scan): no framing to answer in.
                self._transport.write(f"{self._message}\r\n".encode())
                self._transport.close()
                return
            del self._input[: len(f.PREFACE)]
            self._started = True
            self._transport.write(f.settings({}))
        self._frames()

    def _frames(self) -> None:
        pos = 0
        buffer = self._input
        while len(buffer) - pos >= 9:
            length, kind, flags, stream_id = f.parse_header(buffer, pos)
            if len(buffer) - pos - 9 < length:
                break
            if kind == f.SETTINGS and not flags & f.ACK:
                self._transport.write(f.frame(f.SETTINGS, f.ACK, 0))
            elif kind == f.HEADERS and stream_id % 2 == 1:
                # Trailers-only: the call's whole answer in one HEADERS frame.
                block = self._encoder.encode(
                    error_headers(
                        grpc.StatusCode.UNAUTHENTICATED, self._message, trailers_only=True
                    )
                )
                self._transport.write(
                    f.headers(stream_id, block, end_stream=True, max_size=f.MIN_MAX_FRAME_SIZE)
                )
                if not self._closing:
                    self._closing = True
                    debug = self._message.encode()
                    self._transport.write(f.goaway(stream_id, f.NO_ERROR, debug))
                    asyncio.get_running_loop().call_later(LINGER_S, self._transport.close)
            pos += 9 + length
        del buffer[:pos]
