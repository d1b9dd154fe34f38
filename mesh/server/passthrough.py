"""A call on the worker's HTTP/2 front for the grpc.aio server behind it, relayed unchanged.

Why: the front (mesh/server/h2_front.py) serves only a few hot methods itself; every
other call (health, reflection, model control, statistics) goes, frames untouched, to
the full grpc.aio server on a private Unix socket, as the gateway's relay hands its own
services to its server. Flow control is end to end as in the relay (mesh/proxy/stream.py):
what one side sends is credited back to the other once written. If that server resets
the call or cannot be reached, the client is answered UNAVAILABLE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from mesh.proxy import frames as f
from mesh.proxy.grpc_status import error_headers
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side

if TYPE_CHECKING:
    from mesh.server.h2_front import H2Front


class Passthrough:
    """A call for the grpc.aio server behind the front: frames relayed both ways, unchanged."""

    __slots__ = ("done", "down", "front", "request_ended", "started", "up")

    def __init__(self, front: H2Front, down: Side, headers: list[Header], end: bool) -> None:
        self.front = front
        self.down = down
        down.exchange = self
        self.request_ended = end
        self.started = False
        self.done = False
        front.calls.add(self)
        self.up = front.backend().open_stream(self)
        self.up.send_headers(headers, end_stream=end)

    def request_data(self, payload: bytes, flow: int, end_stream: bool) -> None:
        if self.done:
            self.down.credit_back(flow)
            return
        self.request_ended = end_stream
        self.up.send_data(payload, end_stream=end_stream, on_sent=self.down.credit_back, flow=flow)

    def request_trailers(self, end_stream: bool) -> None:
        self.request_data(b"", 0, end_stream)

    def response_headers(self, up: Side, headers: list[Header], end_stream: bool) -> None:
        if self.done:
            return
        self.started = True
        self.down.send_headers(headers, end_stream=end_stream)
        if end_stream:
            up.close()
            self._finish()

    def response_data(self, up: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        if self.done:
            up.credit_back(flow)
            return
        self.down.send_data(payload, end_stream=end_stream, on_sent=up.credit_back, flow=flow)
        if end_stream:
            up.close()
            self._finish()

    def upstream_reset(self, up: Side, code: int) -> None:
        self._lost(f"the server behind the front reset the call (HTTP/2 error {code})")

    def upstream_lost(self, up: Side, detail: str, *, connected: bool) -> None:
        self._lost(f"the server behind the front is unreachable: {detail}")

    def _lost(self, detail: str) -> None:
        if self.done:
            return
        headers = error_headers(grpc.StatusCode.UNAVAILABLE, detail, trailers_only=not self.started)
        self.down.send_headers(headers, end_stream=True)
        self._finish()

    def client_reset(self) -> None:
        if not self.done:
            self.up.reset(f.CANCEL)
            self._finish()

    def _finish(self) -> None:
        self.done = True
        self.down.finish(reset=not self.request_ended)
        self.up.close()
        self.front.calls.discard(self)
