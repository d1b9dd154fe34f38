"""A client's connection to the relay: each new stream becomes a call, within limits.

Why its own module: what the relay does for a connection a client opened is apart from
what it does for the calls on it (mesh/proxy/exchange.py) and from the listening relay
(mesh/proxy/relay.py): admitting the connection and its streams by source
(mesh/routing/limits.py), refusing what is past a limit, answering calls it never opens
(RESOURCE_EXHAUSTED), the connection's timeouts, half-closed streams, and the abuse
checks that end a connection (rapid reset, CVE-2023-44487).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from mesh.header_limits import INBOUND_HEADER_LIST
from mesh.proxy import frames as f
from mesh.proxy.connection import MAX_STREAMS, Connection
from mesh.proxy.exchange import Exchange
from mesh.proxy.grpc_status import error_headers
from mesh.proxy.hpack_codec import Header
from mesh.proxy.inbound import Caller
from mesh.proxy.stream import Side
from mesh.routing import callpolicy as policy
from mesh.routing.limits import LOCAL_SOURCE, RelayLimits, source_of

if TYPE_CHECKING:
    from mesh.proxy.relay import Relay

log = logging.getLogger(__name__)
#: Client resets of unfinished streams on one connection before the rapid-reset check
#: applies (then: at least half the streams opened were reset early → GOAWAY).
PREMATURE_RESETS = 500


class Downstream(Connection):
    """A client's connection to the gateway: each new stream becomes an :class:`Exchange`."""

    client_side = False

    def __init__(self, relay: Relay) -> None:
        if relay.inbound is not None:
            # A sidecar's inbound: its callers are relays that add to what they forward.
            self.max_header_list = INBOUND_HEADER_LIST
        super().__init__(relay.flusher)
        self.relay = relay
        self.last_stream = 0
        #: Streams opened, and those the client reset before their response ended: a
        #: client that mostly resets is an HTTP/2 "rapid reset" attack (CVE-2023-44487).
        self.opened = 0
        self.reset_early = 0
        #: Inbound mode: what the connection proved about the client (its TLS identity).
        self.caller: Caller | None = None
        #: The client's address: what per-source limits count (LOCAL_SOURCE for a Unix socket).
        self.source = LOCAL_SOURCE
        #: The client's IP address (useSourceIp), "" for a Unix socket.
        self.source_ip = ""
        #: The listener port the connection arrived on (match.port); None for a Unix socket.
        self.local_port: int | None = None
        self.admitted = False
        now = relay.loop.time()
        self.born = now
        #: Since when the connection has had no streams (for the idle timeout).
        self.idle_since = now
        #: A complete request header block has arrived (request_headers_timeout).
        self.seen_headers = False
        #: Told GOAWAY at its max duration: new streams are refused, it closes when empty.
        self.retiring = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.source = source_of(transport.get_extra_info("peername"))
        if self.source != LOCAL_SOURCE:
            self.source_ip = self.source
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            self.local_port = int(local[1])
        refused = self.relay.limiter.admit_connection(self.source)
        if refused is not None:
            # Refused cheaply: SETTINGS (already written), GOAWAY, close.
            log.info("refusing a connection: %s", refused)
            self.close_with(f.ENHANCE_YOUR_CALM, refused)
            return
        self.admitted = True
        self.relay.downstreams.add(self)
        if self.relay.inbound is not None:
            self.caller = Caller.of(transport)

    def close_with(self, code: int, reason: str) -> None:
        """GOAWAY (streams up to the last one seen may still be answered), then close."""
        self.write(f.goaway(self.last_stream, code, reason.encode()[:256]))
        self.flush_output()
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def fail(self, code: int, message: str) -> None:
        if code == f.ENHANCE_YOUR_CALM:
            # Abuse (rapid reset, floods): the client is refused for a while, so that
            # reconnecting after each GOAWAY costs it, not every other client.
            self.relay.limiter.penalize(self.source)
        super().fail(code, message)

    def check_timers(self, now: float, limits: RelayLimits) -> None:
        """The connection's timeouts, checked on the relay's tick (see RelayLimits)."""
        headers_timeout = limits.request_headers_timeout
        if headers_timeout:
            if not self.seen_headers and now - self.born >= headers_timeout:
                self.close_with(f.NO_ERROR, f"no request headers within {headers_timeout:g}s")
                return
            if self.awaiting_continuation and now - self.continuation_since >= headers_timeout:
                self.close_with(
                    f.NO_ERROR, f"a header block not completed within {headers_timeout:g}s"
                )
                return
        if (
            limits.idle_timeout
            and not self.streams
            and now - self.idle_since >= limits.idle_timeout
        ):
            self.close_with(f.NO_ERROR, f"idle for {limits.idle_timeout:g}s")
            return
        duration = limits.max_connection_duration
        if duration and not self.retiring and now - self.born >= duration:
            # Graceful: streams already opened finish; the client opens a new connection.
            self.retiring = True
            self.write(f.goaway(self.last_stream, f.NO_ERROR, b"max connection duration"))
            if not self.streams:
                self._close_now()
        stream_idle = limits.stream_idle_timeout
        for side in list(self.streams.values()):
            side.exchange.check_timers(now, stream_idle)

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        side = self.streams.get(stream_id)
        if side is not None:
            if side.exchange.request_ended:
                self._half_closed(side)
                return
            side.exchange.request_trailers(end_stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            if stream_id <= self.last_stream:
                return  # a stream we already finished (say, reset): late trailers
            raise f.ProtocolError(f"client opened even stream {stream_id}")
        self.last_stream = stream_id
        self.seen_headers = True
        if self.relay.draining or self.retiring or len(self.streams) >= MAX_STREAMS:
            self.write(f.rst_stream(stream_id, f.REFUSED_STREAM))
            return
        refused = self.relay.limiter.admit_stream(self.source)
        if refused is not None:
            self._answer(
                stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, refused, end_stream, headers
            )
            return
        side = Side(self, stream_id, None)
        self.streams[stream_id] = side
        self.opened += 1
        Exchange(self.relay, side, headers, end_stream)

    def on_data(self, side: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        if side.exchange.request_ended:
            self._half_closed(side)
            return
        side.exchange.request_data(payload, flow, end_stream)

    def _half_closed(self, side: Side) -> None:
        """A frame after the client's END_STREAM: a stream error (RFC 9113 §5.1), not
        more of the request (forwarded, it would reach the upstream after its end)."""
        side.reset(f.STREAM_CLOSED)
        side.exchange.client_reset()

    def on_oversized_headers(self, stream_id: int, end_stream: bool, detail: str) -> None:
        side = self.streams.get(stream_id)
        if side is not None:  # trailers: the call is cancelled
            side.reset(f.ENHANCE_YOUR_CALM)
            side.exchange.client_reset()
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            return  # late trailers of a finished stream, or (on_headers says) not a stream
        # A new call: answered RESOURCE_EXHAUSTED, as a gRPC server does.
        self.last_stream = stream_id
        self.seen_headers = True
        self._answer(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, detail, end_stream)

    def _answer(
        self,
        stream_id: int,
        code: grpc.StatusCode,
        detail: str,
        end_stream: bool,
        request: Sequence[Header] = (),
    ) -> None:
        """Answers a stream the relay never opened (no exchange, nothing counted), with
        the call's id as every answer carries it (Exchange.request_id)."""
        status = error_headers(code, detail, trailers_only=True)
        if self.relay.inbound is None:
            status = policy.with_request_id(
                status, policy.request_id(request, self.relay.request_id)
            )
        block = self.encoder.encode(status)
        self.write(f.headers(stream_id, block, end_stream=True, max_size=self.peer_max_frame))
        if not end_stream:
            self.write(f.rst_stream(stream_id, f.NO_ERROR))

    def on_reset(self, side: Side, code: int) -> None:
        if not side.exchange.done:
            self.reset_early += 1
        side.exchange.client_reset()
        # Envoy's defaults for the same check: judged after 500 resets, at half the streams.
        if self.reset_early >= PREMATURE_RESETS and 2 * self.reset_early >= self.opened:
            self.fail(
                f.ENHANCE_YOUR_CALM,
                f"{self.reset_early} of {self.opened} streams reset before their response",
            )

    def stream_closed(self, side: Side) -> None:
        super().stream_closed(side)
        self.relay.limiter.release_stream(self.source)
        if not self.streams:
            self.idle_since = self.relay.now
            if self.retiring:
                self._close_now()

    def _close_now(self) -> None:
        """Closes after writing what is batched (the last stream's trailers, GOAWAY)."""
        self.flush_output()
        if self.transport is not None:
            self.transport.close()

    def lost(self, exc: Exception | None) -> None:
        self.relay.downstreams.discard(self)
        for side in list(self.streams.values()):
            side.close()
            side.exchange.client_reset()
        if self.admitted:
            self.admitted = False
            self.relay.limiter.release_connection(self.source)
