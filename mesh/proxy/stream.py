"""One stream as one relay connection sees it: its send window, queued data, credit owed.

Why: the relay forwards frames between two connections, so flow control is end to end
per stream: bytes received on a stream are credited back to their sender (WINDOW_UPDATE)
only once they have been written to the other side. A slow reader therefore slows its
writer instead of growing the relay's memory, which stays bounded by the stream window
it advertises times the streams open. A :class:`Side` is that bookkeeping for one stream
on one connection (a call has one on each); the connection (mesh/proxy/connection.py)
reads frames and hands them to the stream's exchange. :class:`Ended` is what a closed
stream of a finished call points at instead of that exchange.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mesh.proxy import frames as f
from mesh.proxy.connection import STREAM_WINDOW
from mesh.proxy.hpack_codec import Header

if TYPE_CHECKING:
    from mesh.proxy.connection import Connection

OnSent = Callable[[int], None]


class Ended:
    """What a closed stream of a finished call points at, in place of its exchange.

    An exchange and its streams refer to each other. Left so, every call would be garbage
    that only the cycle collector frees (some 20 objects a call: the exchange, its
    streams, their queues and header lists), and its collections took ~10 % of a relay's
    CPU under load (docs/benchmarks.md, "The relay's per-call cost"). Once a stream is
    closed and its call done, the stream is sent no more frames, but the code that closed
    it may still tell the call (a reset, a lost connection): this answers as a finished
    exchange does, by ignoring it, and the call's objects are freed by reference counting.
    """

    __slots__ = ()
    done = True
    request_ended = True

    def request_data(self, payload: bytes, flow: int, end_stream: bool) -> None:
        pass

    def request_trailers(self, end_stream: bool) -> None:
        pass

    def client_reset(self) -> None:
        pass

    def check_timers(self, now: float, stream_idle: float) -> None:
        pass

    def response_headers(self, up: Side, headers: list[Header], end_stream: bool) -> None:
        pass

    def response_data(self, up: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        pass

    def upstream_reset(self, up: Side, code: int) -> None:
        pass

    def upstream_lost(self, up: Side, detail: str, *, connected: bool) -> None:
        pass

    def upstream_connected(self) -> None:
        pass


ENDED = Ended()


class Side:
    """One stream as one connection sees it: send window, queued data, credit owed."""

    __slots__ = (
        "conn",
        "credit",
        "ending",
        "exchange",
        "id",
        "open",
        "queue",
        "recv_window",
        "send_window",
    )

    def __init__(self, conn: Connection, stream_id: int, exchange: Any) -> None:
        self.conn = conn
        self.id = stream_id
        self.send_window = conn.peer_initial_window
        #: DATA waiting for window: (payload, end_stream, called with the flow length once
        #: written, that flow length).
        self.queue: deque[tuple[bytes, bool, OnSent | None, int]] = deque()
        #: Bytes received on this stream, forwarded, not yet credited back.
        self.credit = 0
        #: What the peer may still send on this stream (our SETTINGS_INITIAL_WINDOW_SIZE
        #: plus the WINDOW_UPDATEs we sent, less what it sent).
        self.recv_window = STREAM_WINDOW
        self.exchange = exchange
        self.open = True
        #: Set by :meth:`finish`: close (and maybe reset) once the queue is written.
        self.ending: int | None = None

    def send_headers(self, headers: list[Header], *, end_stream: bool) -> None:
        conn = self.conn
        block = conn.encoder.encode(headers)
        if self.queue:
            # Trailers must follow the data queued before them.
            self.queue.append((block, end_stream, None, -1))
            return
        conn.write(f.headers(self.id, block, end_stream=end_stream, max_size=conn.peer_max_frame))

    def send_data(
        self, payload: bytes, *, end_stream: bool, on_sent: OnSent | None = None, flow: int = 0
    ) -> None:
        """DATA now if the windows allow, else queued; ``on_sent(flow)`` once it is written."""
        conn = self.conn
        size = len(payload)
        if (
            not self.queue
            and size <= self.send_window
            and size <= conn.send_window
            and not conn.paused
        ):
            self.send_window -= size
            conn.send_window -= size
            conn.write(f.frame(f.DATA, f.END_STREAM if end_stream else 0, self.id, payload))
            if on_sent is not None:
                on_sent(flow)
            return
        self.queue.append((payload, end_stream, on_sent, flow))
        self.flush()

    def flush(self) -> None:
        """Writes queued frames as far as the stream and connection windows allow."""
        conn = self.conn
        queue = self.queue
        while queue:
            if conn.paused:
                return  # the socket is full: resume_writing flushes again
            payload, end_stream, on_sent, flow = queue[0]
            if flow < 0:  # a queued header block
                queue.popleft()
                conn.write(
                    f.headers(self.id, payload, end_stream=end_stream, max_size=conn.peer_max_frame)
                )
                continue
            room = min(self.send_window, conn.send_window)
            size = len(payload)
            if size > room:
                if room <= 0:
                    if conn.send_window <= 0:
                        conn.blocked[self.id] = self
                    return
                # Send what fits; the rest waits (it carries the end flag and the credit).
                head, rest = payload[:room], payload[room:]
                queue[0] = (rest, end_stream, on_sent, flow)
                self.send_window -= room
                conn.send_window -= room
                conn.write(f.frame(f.DATA, 0, self.id, head))
                continue
            queue.popleft()
            self.send_window -= size
            conn.send_window -= size
            conn.write(f.frame(f.DATA, f.END_STREAM if end_stream else 0, self.id, payload))
            if on_sent is not None:
                on_sent(flow)
        if self.ending is not None:
            self._end()

    def finish(self, *, reset: bool = False) -> None:
        """Closes the stream once what is queued on it is written; with ``reset``, then
        sends RST_STREAM NO_ERROR (the peer may stop sending)."""
        self.ending = f.NO_ERROR if reset else -1
        if not self.queue:
            self._end()

    def _end(self) -> None:
        if self.ending is not None and self.ending >= 0 and self.open:
            self.conn.write(f.rst_stream(self.id, self.ending))
        self.close()

    def reset(self, code: int) -> None:
        if self.open:
            self.conn.write(f.rst_stream(self.id, code))
        self.close()

    def close(self) -> None:
        """Forgets the stream on its connection (no frames are written). Data still queued
        is dropped and credited back to where it came from."""
        if self.open:
            self.open = False
            if self.queue:  # most streams close with nothing queued: no new deque
                queued, self.queue = self.queue, deque()
                for _, _, on_sent, flow in queued:
                    if on_sent is not None and flow > 0:
                        on_sent(flow)
            self.conn.stream_closed(self)
            if getattr(self.exchange, "done", False):
                self.exchange = ENDED  # see Ended

    def credit_back(self, flow: int) -> None:
        """Returns stream receive window for ``flow`` bytes of this stream that were
        forwarded (the connection's was returned when they arrived)."""
        conn = self.conn
        if self.open:
            self.credit += flow
            if self.credit >= STREAM_WINDOW // 2:
                conn.write(f.window_update(self.id, self.credit))
                self.recv_window += self.credit
                self.credit = 0
