"""A client's connection to the worker's HTTP/2 front: each new stream a call, served or relayed.

Why: the front (mesh/server/h2_front.py) is the server side of the relay's HTTP/2
engine (mesh/proxy/connection.py); this is what it adds per connection: a new stream
whose path is a hot method becomes a :class:`~mesh.server.local_call.LocalCall`, any
other a :class:`~mesh.server.passthrough.Passthrough` to the grpc.aio server behind the
front; streams past MAX_STREAMS, or opened while the front drains, are refused
(REFUSED_STREAM), and a header list over the limit is answered RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from mesh.header_limits import MAX_SERVER_METADATA
from mesh.proxy import frames as f
from mesh.proxy.connection import MAX_STREAMS, Connection
from mesh.proxy.grpc_status import error_headers
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side
from mesh.server.local_call import LocalCall
from mesh.server.passthrough import Passthrough

if TYPE_CHECKING:
    from mesh.server.h2_front import H2Front


class FrontConnection(Connection):
    """A client's connection to the front: each new stream is a LocalCall or a Passthrough."""

    client_side = False
    #: As the gRPC server behind it: reached through the sidecar's inbound.
    max_header_list = MAX_SERVER_METADATA

    def __init__(self, front: H2Front) -> None:
        super().__init__(front.flusher)
        self.front = front
        self.last_stream = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.front.connections.add(self)

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        side = self.streams.get(stream_id)
        if side is not None:
            side.exchange.request_trailers(end_stream)
            return
        if stream_id % 2 == 0:
            raise f.ProtocolError(f"client opened even stream {stream_id}")
        if stream_id <= self.last_stream:
            return  # late trailers of a stream already finished
        self.last_stream = stream_id
        front = self.front
        if front.draining or len(self.streams) >= MAX_STREAMS:
            self.write(f.rst_stream(stream_id, f.REFUSED_STREAM))
            return
        side = Side(self, stream_id, None)
        self.streams[stream_id] = side
        path = b""
        for name, value in headers:
            if name == b":path":
                path = value
                break
        method = front.hot.get(path)
        if method is not None:
            LocalCall(front, side, method, headers, end_stream)
        else:
            Passthrough(front, side, headers, end_stream)

    def on_data(self, side: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        side.exchange.request_data(payload, flow, end_stream)

    def on_reset(self, side: Side, code: int) -> None:
        side.exchange.client_reset()

    def on_oversized_headers(self, stream_id: int, end_stream: bool, detail: str) -> None:
        side = self.streams.get(stream_id)
        if side is not None:
            side.reset(f.ENHANCE_YOUR_CALM)
            side.exchange.client_reset()
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            return
        self.last_stream = stream_id
        block = self.encoder.encode(
            error_headers(grpc.StatusCode.RESOURCE_EXHAUSTED, detail, trailers_only=True)
        )
        self.write(f.headers(stream_id, block, end_stream=True, max_size=self.peer_max_frame))
        if not end_stream:
            self.write(f.rst_stream(stream_id, f.NO_ERROR))

    def lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        for side in list(self.streams.values()):
            side.close()
            side.exchange.client_reset()
