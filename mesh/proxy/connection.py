"""One HTTP/2 connection of the relay: framing, settings, pings, flow control, batched writes.

The relay forwards frames between two connections, so flow control is end to end per
stream (each stream's window, queue and credit: mesh/proxy/stream.py). The connection
window, shared by every stream, is credited as DATA arrives (RFC 9113 §5.2.2): held for
queued data, a few stalled streams would stall every call on the connection.

Writes are batched: every frame a pass over the input produces is joined and written
once at its end (mesh/proxy/flusher.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from mesh.header_limits import MAX_HEADER_LIST
from mesh.proxy import frames as f
from mesh.proxy.flusher import Flusher
from mesh.proxy.hpack_codec import (
    Header,
    HeaderDecoder,
    HeaderEncoder,
    HeaderError,
    HeaderListTooLarge,
)

if TYPE_CHECKING:
    from mesh.proxy.stream import Side

log = logging.getLogger(__name__)

#: What the relay advertises: a stream may have this much unacknowledged in flight...
STREAM_WINDOW = 1 << 20
#: ...and a whole connection this much.
CONNECTION_WINDOW = 1 << 24
#: The most streams a peer may have open on a connection to the relay (a client's
#: streams past it are refused): with STREAM_WINDOW, what bounds one connection's memory.
MAX_STREAMS = 4096
#: PING and SETTINGS frames a peer may send per second: each costs the relay a reply, so
#: more is a flood (CVE-2019-9512, -9515), answered with GOAWAY(ENHANCE_YOUR_CALM). gRPC
#: peers send a few per second (BDP probes, keepalives). Frames that carry nothing to
#: relay count too (CVE-2019-9518: empty DATA or CONTINUATION, PRIORITY, unknown types):
#: they cost a parse each and no flow-control window, so nothing else bounds them, and
#: gRPC peers send none.
CONTROL_FRAMES_PER_SECOND = 1000


class Connection(asyncio.Protocol):
    """The framing and bookkeeping both sides of the relay share; subclasses own streams."""

    client_side = False
    #: The largest header list accepted from the peer (see mesh.header_limits).
    max_header_list = MAX_HEADER_LIST

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self.transport: asyncio.Transport | None = None
        self._input = bytearray()
        self._preface_pending = not self.client_side
        self._out: list[bytes] = []
        self._dirty = False
        self.decoder = HeaderDecoder(max_list_size=self.max_header_list)
        self.encoder = HeaderEncoder()
        self.streams: dict[int, Side] = {}
        #: Sides waiting for connection-level window, in arrival order.
        self.blocked: dict[int, Side] = {}
        self.send_window = f.DEFAULT_WINDOW
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.MIN_MAX_FRAME_SIZE
        self.peer_max_streams = 1 << 31
        self._connection_credit = 0
        #: What the peer may still send on the connection (see ``Side.recv_window``).
        self.recv_window = CONNECTION_WINDOW
        #: (stream id, flags of the HEADERS, block so far) while CONTINUATION is awaited.
        self._continuation: tuple[int, int, bytearray] | None = None
        #: When the pending header block began (its completion is timed: a peer could
        #: otherwise hold a half-sent block, and the connection, forever).
        self.continuation_since = 0.0
        self.closed = False
        self.going_away = False
        #: The transport's write buffer is over its high-water mark: DATA waits.
        self.paused = False
        #: PING/SETTINGS (and empty) frames received in the current one-second window,
        #: and its start.
        self._control_frames = 0
        self._control_window = 0.0

    # -- output -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._dirty:
            self._dirty = True
            self.flusher.mark(self)

    def flush_output(self) -> None:
        self._dirty = False
        if self._out and self.transport is not None and not self.closed:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)

    def opening_frames(self) -> bytes:
        settings = f.settings(
            {
                f.HEADER_TABLE_SIZE: self.decoder.max_table_size,
                f.ENABLE_PUSH: 0,
                f.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                f.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                f.MAX_FRAME_SIZE: f.MIN_MAX_FRAME_SIZE,
                f.MAX_HEADER_LIST_SIZE: self.max_header_list,
            }
        )
        opening = settings + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW)
        return (f.PREFACE + opening) if self.client_side else opening

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not necessarily an asyncio.Transport subclass: uvloop's
        # (TCP, Unix, and its TLS one) implement the interface without inheriting it,
        # and an isinstance check here failed every connection under uvloop.
        self.transport = cast(asyncio.Transport, transport)
        # Frames written before the connection existed (an upstream still connecting)
        # go after the preface and SETTINGS.
        self._out.insert(0, self.opening_frames())
        self.flush_output()

    def data_received(self, data: bytes) -> None:
        self.flusher.passes += 1
        try:
            self._receive(data)
        except f.ProtocolError as exc:
            self.fail(exc.code, str(exc))
        except HeaderError as exc:
            self.fail(f.COMPRESSION_ERROR, str(exc))
        finally:
            self.flusher.passes -= 1
            self.flusher.flush()

    def pause_writing(self) -> None:
        # A peer may grant any window and then not read: without this, what the windows
        # allow would pile up in the transport instead of staying with the sender.
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for side in list(self.streams.values()):
            if side.queue:
                side.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self.lost(exc)
        self.flusher.flush()

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY, then close."""
        log.warning("closing HTTP/2 connection: %s", message)
        last = max((s for s in self.streams if (s % 2 == 1) != self.client_side), default=0)
        self.write(f.goaway(last, code, message.encode()[:256]))
        self.flush_output()
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    # -- input ---------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        if not self._input and not self._preface_pending:
            # The usual read holds whole frames: parsed straight from it (one copy per
            # payload, none for the read), only a partial frame at its end is kept.
            pos = self._frames(data, 0)
            if pos < len(data):
                self._input += data[pos:]
            return
        buffer = self._input
        buffer += data
        pos = 0
        if self._preface_pending:
            if len(buffer) < len(f.PREFACE):
                if not f.PREFACE.startswith(bytes(buffer)):
                    raise f.ProtocolError("not an HTTP/2 connection preface")
                return
            if buffer[: len(f.PREFACE)] != f.PREFACE:
                raise f.ProtocolError("not an HTTP/2 connection preface")
            self._preface_pending = False
            pos = len(f.PREFACE)
        pos = self._frames(buffer, pos)
        del buffer[:pos]

    def _frames(self, data: bytes | bytearray, pos: int) -> int:
        """Handles the whole frames in ``data`` from ``pos``; returns where the rest begins."""
        end = len(data)
        while end - pos >= 9 and not self.closed:
            length, kind, flags, stream_id = f.parse_header(data, pos)
            if length > f.MIN_MAX_FRAME_SIZE:
                raise f.ProtocolError(f"frame of {length} bytes over 16384", f.FRAME_SIZE_ERROR)
            stop = pos + 9 + length
            if stop > end:
                break
            payload = data[pos + 9 : stop]
            pos = stop
            # A bytearray's slice is one too: payloads are kept (queued, replayed) as bytes.
            self._frame(
                kind, flags, stream_id, payload if isinstance(payload, bytes) else bytes(payload)
            )
        return pos

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != f.CONTINUATION:
            raise f.ProtocolError("expected CONTINUATION")
        if kind == f.DATA:
            if stream_id == 0:
                raise f.ProtocolError("DATA on stream 0")
            side = self.streams.get(stream_id)
            flow = len(payload)
            # RFC 9113 §6.9.1: a peer sending past our windows is treated as a connection
            # error; unchecked, it could make the relay queue without bound.
            self.recv_window -= flow
            if self.recv_window < 0:
                raise f.ProtocolError("DATA past the connection window", f.FLOW_CONTROL_ERROR)
            self.credit_connection(flow)
            if side is None:
                return  # a stream already closed (say, reset)
            side.recv_window -= flow
            if side.recv_window < 0:
                raise f.ProtocolError("DATA past the stream window", f.FLOW_CONTROL_ERROR)
            data = f.unpad(payload, flags)
            if not data and not flags & f.END_STREAM:
                self._count_control_frame()
            self.on_data(side, data, flow, bool(flags & f.END_STREAM))
        elif kind == f.HEADERS:
            if stream_id == 0:
                raise f.ProtocolError("HEADERS on stream 0")
            block = f.unpad(payload, flags, priority=True)
            if flags & f.END_HEADERS:
                self._headers(stream_id, flags, block)
            else:
                self._continuation = (stream_id, flags, bytearray(block))
                self.continuation_since = time.monotonic()
        elif kind == f.CONTINUATION:
            pending = self._continuation
            if pending is None or pending[0] != stream_id:
                raise f.ProtocolError("unexpected CONTINUATION")
            if not payload and not flags & f.END_HEADERS:
                self._count_control_frame()
            pending[2].extend(payload)
            if len(pending[2]) > 4 * self.max_header_list:
                raise f.ProtocolError("header block too large", f.ENHANCE_YOUR_CALM)
            if flags & f.END_HEADERS:
                self._continuation = None
                self._headers(stream_id, pending[1], bytes(pending[2]))
        elif kind == f.SETTINGS:
            if flags & f.ACK:
                return
            self._count_control_frame()
            self._settings(payload)
        elif kind == f.WINDOW_UPDATE:
            self._window_update(stream_id, f.parse_u32(payload))
        elif kind == f.PING:
            if len(payload) != 8:
                raise f.ProtocolError("PING payload must be 8 bytes", f.FRAME_SIZE_ERROR)
            if not flags & f.ACK:
                self._count_control_frame()
                self.write(f.frame(f.PING, f.ACK, 0, payload))
        elif kind == f.RST_STREAM:
            code = f.parse_u32(payload)
            side = self.streams.get(stream_id)
            if side is not None:
                side.close()
                self.on_reset(side, code)
        elif kind == f.GOAWAY:
            last, code = f.parse_goaway(payload)
            self.going_away = True
            self.on_goaway(last, code)
        elif kind == f.PUSH_PROMISE:
            raise f.ProtocolError("PUSH_PROMISE with push disabled")
        else:
            # PRIORITY and unknown frame types are ignored (RFC 9113 §4.1, §5.3.2), but
            # counted: they carry nothing to relay.
            self._count_control_frame()

    @property
    def awaiting_continuation(self) -> bool:
        return self._continuation is not None

    def _count_control_frame(self) -> None:
        now = time.monotonic()
        if now - self._control_window >= 1.0:
            self._control_window, self._control_frames = now, 0
        self._control_frames += 1
        if self._control_frames > CONTROL_FRAMES_PER_SECOND:
            raise f.ProtocolError(
                f"over {CONTROL_FRAMES_PER_SECOND} PING, SETTINGS or empty frames in a second",
                f.ENHANCE_YOUR_CALM,
            )

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block)
        except HeaderListTooLarge as exc:
            # The decoder kept its table in step: only this stream fails (RFC 9113 §10.5.1).
            self.on_oversized_headers(stream_id, bool(flags & f.END_STREAM), str(exc))
            return
        self.on_headers(stream_id, headers, bool(flags & f.END_STREAM))

    def _settings(self, payload: bytes) -> None:
        for key, value in f.parse_settings(payload):
            if key == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise f.ProtocolError("INITIAL_WINDOW_SIZE too large", f.FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for side in self.streams.values():
                    side.send_window += delta
                    if side.send_window > f.MAX_WINDOW:  # RFC 9113 §6.9.2
                        raise f.ProtocolError("a stream window over 2^31-1", f.FLOW_CONTROL_ERROR)
            elif key == f.MAX_FRAME_SIZE:
                if not f.MIN_MAX_FRAME_SIZE <= value <= (1 << 24) - 1:
                    raise f.ProtocolError("MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == f.MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
        self.write(f.SETTINGS_ACK)
        for side in list(self.streams.values()):
            if side.queue:
                side.flush()
        self.settings_changed()

    def _window_update(self, stream_id: int, increment: int) -> None:
        if increment == 0:
            raise f.ProtocolError("WINDOW_UPDATE of 0")
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:  # RFC 9113 §6.9.1
                raise f.ProtocolError("connection window over 2^31-1", f.FLOW_CONTROL_ERROR)
            blocked = list(self.blocked.values())
            self.blocked.clear()
            for waiting in blocked:
                if waiting.open:
                    waiting.flush()
            return
        side = self.streams.get(stream_id)
        if side is not None:
            side.send_window += increment
            if side.send_window > f.MAX_WINDOW:
                # A stream error (RFC 9113 §6.9.1): the call ends as if the peer reset it.
                side.reset(f.FLOW_CONTROL_ERROR)
                self.on_reset(side, f.FLOW_CONTROL_ERROR)
                return
            if side.queue:
                side.flush()

    def credit_connection(self, flow: int) -> None:
        self._connection_credit += flow
        if self._connection_credit >= CONNECTION_WINDOW // 2 and not self.closed:
            self.write(f.window_update(0, self._connection_credit))
            self.recv_window += self._connection_credit
            self._connection_credit = 0

    def stream_closed(self, side: Side) -> None:
        self.streams.pop(side.id, None)
        self.blocked.pop(side.id, None)

    # -- for subclasses -------------------------------------------------------------------

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        raise NotImplementedError

    def on_data(self, side: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        raise NotImplementedError

    def on_reset(self, side: Side, code: int) -> None:
        raise NotImplementedError

    def on_oversized_headers(self, stream_id: int, end_stream: bool, detail: str) -> None:
        """A header block on ``stream_id`` decoded to more than ``max_header_list``."""
        raise NotImplementedError

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        """The peer is closing the connection."""

    def lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def settings_changed(self) -> None:
        """The peer's SETTINGS were applied."""
