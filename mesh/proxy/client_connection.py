"""The client side of a relay connection: the streams it opens, and the answers it reads.

Why its own module: the relay's upstreams (mesh/proxy/pool.py) and the worker's HTTP/2
front, towards the grpc.aio server behind it (mesh/server/h2_front.py), both dial out;
what a client side adds to the framing both sides share (mesh/proxy/connection.py) is
small and the same for both: stream ids it hands out, a peer's answers passed to the call
that opened the stream, and retirement (GOAWAY, stream ids spent) that closes the
connection once its last call ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mesh.proxy import frames as f
from mesh.proxy.connection import Connection
from mesh.proxy.flusher import Flusher
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side


class ClientConnection(Connection):
    """The client side of a connection: the streams it opens, each for one call, and the
    peer's answers passed on to that call (its ``response_headers``/``response_data``/
    ``upstream_reset``/``upstream_lost``). The relay's upstreams and the worker's front
    (to the grpc.aio server behind it) are both this."""

    client_side = True

    def __init__(self, flusher: Flusher) -> None:
        super().__init__(flusher)
        self.next_id = 1
        self.connected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected = True
        super().connection_made(transport)
        if self.going_away and not self.streams:
            # Retired while connecting, its calls gone: stream_closed had no transport.
            transport.close()

    def open_stream(self, call: Any) -> Side:
        side = Side(self, self.next_id, call)
        self.streams[self.next_id] = side
        self.next_id += 2
        if self.next_id > (1 << 30):
            # Far from the 2^31 limit, a fresh connection takes over new streams.
            self.going_away = True
        return side

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        side = self.streams.get(stream_id)
        if side is not None:
            side.exchange.response_headers(side, headers, end_stream)

    def on_data(self, side: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        side.exchange.response_data(side, payload, flow, end_stream)

    def on_reset(self, side: Side, code: int) -> None:
        side.exchange.upstream_reset(side, code)

    def on_oversized_headers(self, stream_id: int, end_stream: bool, detail: str) -> None:
        side = self.streams.get(stream_id)
        if side is not None:
            side.reset(f.CANCEL)
            side.exchange.upstream_reset(side, f.INTERNAL_ERROR)

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        # Streams above the last one the peer processed never ran: safe to retry.
        for side in [s for s in self.streams.values() if s.id > last_stream_id]:
            side.close()
            side.exchange.upstream_reset(side, f.REFUSED_STREAM)

    def lost(self, exc: Exception | None) -> None:
        self.closed = True
        detail = str(exc) if exc else "connection closed"
        for side in list(self.streams.values()):
            side.close()
            side.exchange.upstream_lost(side, detail, connected=self.connected)

    def stream_closed(self, side: Side) -> None:
        super().stream_closed(side)
        if self.going_away and not self.streams and self.transport is not None:
            # Retired (GOAWAY, replaced, stream ids spent): closes when its last call ends.
            self.transport.close()
