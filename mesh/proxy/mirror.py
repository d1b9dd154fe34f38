"""A mirrored copy of one call (Istio ``mirror``): the request's frames sent again to
another destination on a stream of its own, the responses discarded.

The copy never slows or fails the primary: it is fed from the primary's request frames
as they pass, never holds the client's flow control, and when its upstream cannot take
a frame now (window or queue full) or fails, the copy is dropped (reset) rather than
buffered without bound. It has its own deadline (the primary's budget when it has one,
else MIRROR_TIMEOUT), and is not counted for loads, retries or outlier detection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mesh.config.client_tls import ISTIO_MUTUAL, ClientTls
from mesh.proxy import frames as f
from mesh.proxy.connection import STREAM_WINDOW
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side

if TYPE_CHECKING:
    from mesh.proxy.relay import Relay

#: A copy's deadline when the primary call has none.
MIRROR_TIMEOUT = 30.0
#: A copy whose upstream already has this many bytes not yet written (its window is
#: full) is dropped: the bound a stream's buffer has anywhere in the relay (one stream
#: window), plus at most the frame that found it full.
MIRROR_QUEUE_LIMIT = STREAM_WINDOW


class Mirror:
    """One copy: its upstream stream, the bytes queued on it, its timer."""

    def __init__(
        self,
        relay: Relay,
        address: str,
        headers: list[Header],
        timeout: float,
        tls: ClientTls = ISTIO_MUTUAL,
    ) -> None:
        self.queued = 0
        self.up: Side | None = relay.pool.get(address, tls=tls).open_stream(self)
        self.up.send_headers(headers, end_stream=False)
        self._timer: asyncio.TimerHandle | None = relay.loop.call_later(timeout, self.drop)

    @property
    def live(self) -> bool:
        return self.up is not None

    def send(self, payload: bytes, end_stream: bool) -> None:
        """Copies one request frame, or drops the copy when its upstream is behind."""
        up = self.up
        if up is None:
            return
        if not up.open or self.queued >= MIRROR_QUEUE_LIMIT:
            self.drop()
            return
        self.queued += len(payload)
        up.send_data(payload, end_stream=end_stream, on_sent=self._sent, flow=len(payload))

    def _sent(self, flow: int) -> None:
        self.queued -= flow

    def drop(self) -> None:
        """Cancels the copy (deadline, a full window, or the primary gave up mid-request)."""
        up, self.up = self.up, None
        if up is not None and up.open:
            up.reset(f.CANCEL)
        self._done()

    def _done(self) -> None:
        self.up = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the upstream's side: everything is discarded -------------------------------------

    def response_headers(self, up: Side, headers: list[Header], end_stream: bool) -> None:
        if end_stream:
            up.close()
            self._done()

    def response_data(self, up: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        up.credit_back(flow)
        if end_stream:
            up.close()
            self._done()

    def upstream_reset(self, up: Side, code: int) -> None:
        up.close()
        self._done()

    def upstream_lost(self, up: Side, detail: str, *, connected: bool) -> None:
        self._done()
