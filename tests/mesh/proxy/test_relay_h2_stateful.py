"""The relay between an ``h2`` client and an ``h2`` server, driven by Hypothesis.

h2 is the reference HTTP/2 state machine: every frame the relay writes is parsed and
checked by it on both sides (a protocol, flow-control or header error there is a relay
bug). The client opens unary and bidi-streaming calls, sends messages of random sizes
(large ones span several WINDOW_UPDATEs on both hops), ends or cancels them; the server
answers, resets, or sends GOAWAY and closes; either pings or changes its initial window;
metadata is sometimes larger than a frame; each peer reads (credits back) what it
received only when a rule says so, so the relay's queues fill and drain. Checked after every step:
no frame h2 rejects, no negative window in the relay; a call the client completes got
exactly the response messages and status the server sent on its last attempt; and at
the end, once every call is over, the relay holds no stream and no exchange.

Bytes in, bytes out (tests/support/relay_memory.py): no sockets, no waiting.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from h2.config import H2Configuration
from h2.connection import H2Connection
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mesh.proxy.pool import Upstream
from protos.inference import grpc_service_pb2 as pb
from tests.support.relay_memory import MemoryRelay, MemoryTransport

UNARY = b"/inference.GRPCInferenceService/ModelInfer"
STREAMING = b"/inference.GRPCInferenceService/ModelStreamInfer"
#: Reset codes that say the peer broke the protocol: the relay must never send one to
#: a peer that h2 drives correctly.
FAULT_CODES = {
    h2.errors.ErrorCodes.PROTOCOL_ERROR,
    h2.errors.ErrorCodes.FLOW_CONTROL_ERROR,
    h2.errors.ErrorCodes.STREAM_CLOSED,
    h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
    h2.errors.ErrorCodes.COMPRESSION_ERROR,
}
sizes = st.integers(min_value=0, max_value=150_000)
#: Metadata sizes: most small, some over a frame (HEADERS + CONTINUATION on both hops).
pads = st.sampled_from([0, 0, 10, 20_000])


def message(size: int) -> bytes:
    """A length-prefixed ModelInferRequest of about ``size`` bytes (the sample config
    routes inference calls on its model_name and model_version fields)."""
    body = pb.ModelInferRequest(
        model_name="resnet", model_version="3", raw_input_contents=[b"\x07" * size]
    ).SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def reply(size: int) -> bytes:
    return b"\x00" + size.to_bytes(4, "big") + bytes(i % 251 for i in range(size))


@dataclass
class Call:
    number: int
    stream_id: int
    streaming: bool
    pending: bytearray = field(default_factory=bytearray)
    end_pending: bool = False
    request_ended: bool = False
    data: bytearray = field(default_factory=bytearray)
    status: bytes | None = None
    trailer_pad: bytes = b""
    over: bool = False


@dataclass
class Server:
    upstream: Upstream
    transport: MemoryTransport
    h2: H2Connection
    alive: bool = True
    #: Data received and not yet read (acknowledged): flow length by stream.
    unread: dict[int, int] = field(default_factory=dict)


@dataclass
class Attempt:
    """One upstream stream of a call, as the server sees it."""

    server: Server
    stream_id: int
    call: int
    request_ended: bool = False
    pending: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    sent: bytearray = field(default_factory=bytearray)
    status: bytes | None = None
    pad: bytes = b""
    answered: bool = False
    over: bool = False


def _peer(client_side: bool) -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    # As gRPC peers do: a connection window larger than a stream's, so a stream's own
    # window is what stops it.
    conn.increment_flow_control_window(1 << 20)
    return conn


class RelayMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mesh = MemoryRelay()
        self.client = _peer(True)
        self.calls: dict[int, Call] = {}
        self.by_stream: dict[int, Call] = {}
        self.servers: list[Server] = []
        #: What the client received and has not read yet: a slow reader's window closes.
        self.client_unread: dict[int, int] = {}
        self.attempts: dict[tuple[int, int], Attempt] = {}
        self.last_attempt: dict[int, Attempt] = {}
        #: Each call's padding metadata (large ones need CONTINUATION frames).
        self.pads: dict[int, bytes] = {}
        #: Whose SETTINGS lowered the initial window: the relay's send windows toward it
        #: may then be negative, as RFC 9113 §6.9.2 allows.
        self.lowered: set[int] = set()
        #: An h2 connection failed: teardown's checks would only fail again.
        self.broken = False
        self.pump()

    # -- moving bytes ----------------------------------------------------------------

    def pump(self) -> None:
        for _ in range(10_000):
            moved = self._send_pending()
            out = self.client.data_to_send()
            if out:
                moved = True
                self.mesh.from_client(out)
            for upstream, transport in self.mesh.pool.connections[len(self.servers) :]:
                self.servers.append(Server(upstream, transport, _peer(False)))
            for server in self.servers:
                out = server.h2.data_to_send()
                if out and server.alive:
                    moved = True
                    self.mesh.from_upstream(server.upstream, out)
            received = self.mesh.to_client()
            if received:
                moved = True
                self._client_events(self._receive(self.client, received, "client"))
            for server in self.servers:
                received = server.transport.take()
                if received and server.alive:
                    moved = True
                    self._server_events(server, self._receive(server.h2, received, "server"))
            if not moved:
                return
        raise AssertionError("bytes still moving after 10000 passes")

    def _receive(self, conn: H2Connection, data: bytes, side: str) -> list[h2.events.Event]:
        try:
            return conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.broken = True
            raise AssertionError(f"the relay sent the {side} a frame h2 rejects: {exc!r}") from exc

    def _send_pending(self) -> bool:
        moved = False
        for call in self.calls.values():
            if not call.over and not call.request_ended:
                moved |= self._drain(self.client, call.stream_id, call.pending)
                if call.end_pending and not call.pending:
                    self.client.end_stream(call.stream_id)
                    call.request_ended = True
                    moved = True
        for attempt in self.attempts.values():
            if attempt.server.alive and not attempt.over and attempt.trailers is not None:
                conn = attempt.server.h2
                moved |= self._drain(conn, attempt.stream_id, attempt.pending)
                if not attempt.pending:
                    conn.send_headers(attempt.stream_id, attempt.trailers, end_stream=True)
                    attempt.trailers = None
                    attempt.answered = True
                    moved = True
        return moved

    @staticmethod
    def _drain(conn: H2Connection, stream_id: int, pending: bytearray) -> bool:
        """Sends what the windows allow of ``pending``."""
        moved = False
        while pending:
            room = min(
                len(pending),
                conn.local_flow_control_window(stream_id),
                conn.max_outbound_frame_size,
            )
            if room <= 0:
                break
            conn.send_data(stream_id, bytes(pending[:room]))
            del pending[:room]
            moved = True
        return moved

    def _client_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                raise AssertionError(f"the relay sent the client GOAWAY: {event}")
            call = self.by_stream.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.DataReceived):
                assert call is not None
                call.data += event.data
                self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                assert call is not None
                for name, value in event.headers:
                    if name == b"grpc-status":
                        call.status = value
                    elif name == b"x-pad":
                        call.trailer_pad = value
            elif isinstance(event, h2.events.StreamEnded):
                assert call is not None
                call.over = True
                self._check_completed(call)
            elif isinstance(event, h2.events.StreamReset):
                assert call is not None
                assert event.error_code not in FAULT_CODES, f"relay reset the client: {event}"
                call.over = True

    def _check_completed(self, call: Call) -> None:
        """The client's view of a completed call matches what its last attempt sent."""
        assert call.status is not None, f"call {call.number} ended without grpc-status"
        attempt = self.last_attempt.get(call.number)
        if attempt is not None and attempt.answered:
            assert call.status == attempt.status, (call.number, call.status, attempt.status)
            assert bytes(call.data) == bytes(attempt.sent), f"call {call.number}: other messages"
            assert call.trailer_pad == attempt.pad, f"call {call.number}: trailers changed"
        else:
            # The relay answered (a reset or lost upstream, a refused call): an error.
            assert call.status != b"0" and not call.data, (call.number, call.status)

    def _server_events(self, server: Server, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                raise AssertionError(f"the relay sent the server GOAWAY: {event}")
            key = (id(server), getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                number = int(headers[b"x-call"])
                assert headers[b"x-pad"] == self.pads[number], f"call {number}: metadata changed"
                opened = Attempt(server, event.stream_id, number)
                self.attempts[key] = self.last_attempt[number] = opened
                continue
            attempt = self.attempts.get(key)
            if isinstance(event, h2.events.DataReceived):
                assert attempt is not None
                unread = server.unread
                unread[event.stream_id] = (
                    unread.get(event.stream_id, 0) + event.flow_controlled_length
                )
            elif isinstance(event, h2.events.StreamEnded):
                assert attempt is not None
                attempt.request_ended = True
            elif isinstance(event, h2.events.StreamReset):
                assert attempt is not None
                assert event.error_code not in FAULT_CODES, f"relay reset the server: {event}"
                attempt.over = True

    # -- rules -------------------------------------------------------------------------

    @rule(streaming=st.booleans(), size=sizes, pad=pads)
    def open_call(self, streaming: bool, size: int, pad: int) -> None:
        number = len(self.calls)
        stream_id = self.client.get_next_available_stream_id()
        call = Call(number, stream_id, streaming)
        self.pads[number] = b"p" * pad
        self.calls[number] = self.by_stream[stream_id] = call
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", STREAMING if streaming else UNARY),
            (b":authority", b"gateway"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"x-call", str(number).encode()),
            (b"x-pad", b"p" * pad),
        ]
        self.client.send_headers(stream_id, headers)
        if not streaming:
            call.pending += message(size)
            call.end_pending = True
        self.pump()

    def _open_calls(self, *, streaming: bool | None = None) -> list[Call]:
        return [
            c
            for c in self.calls.values()
            if not c.over and not c.end_pending and (streaming is None or c.streaming == streaming)
        ]

    @precondition(lambda self: self._open_calls(streaming=True))
    @rule(data=st.data(), size=sizes)
    def send_message(self, data: st.DataObject, size: int) -> None:
        call = data.draw(st.sampled_from(self._open_calls(streaming=True)))
        call.pending += message(size)
        self.pump()

    @precondition(lambda self: self._open_calls(streaming=True))
    @rule(data=st.data())
    def end_request(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(self._open_calls(streaming=True)))
        call.end_pending = True
        self.pump()

    @precondition(lambda self: any(not c.over for c in self.calls.values()))
    @rule(data=st.data())
    def client_cancel(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from([c for c in self.calls.values() if not c.over]))
        self.client.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
        call.over = True
        self.pump()

    def _answerable(self) -> list[Attempt]:
        return [
            a
            for a in self.attempts.values()
            if a.server.alive and not a.over and a.trailers is None and not a.answered
        ]

    @precondition(lambda self: self._answerable())
    @rule(data=st.data(), status=st.sampled_from([b"0", b"3", b"5"]), pad=pads)
    def server_answer(self, data: st.DataObject, status: bytes, pad: int) -> None:
        attempt = data.draw(st.sampled_from(self._answerable()))
        if self.calls[attempt.call].streaming:
            replies = data.draw(st.lists(sizes, max_size=3))
        elif not attempt.request_ended:
            # Before the request ended: only an error, as a server refusing a call.
            status, replies = (b"3" if status == b"0" else status), []
        else:
            replies = [data.draw(sizes)] if status == b"0" else []
        conn = attempt.server.h2
        conn.send_headers(
            attempt.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
        )
        for size in replies:
            attempt.pending += reply(size)
            attempt.sent += reply(size)
        attempt.status = status
        attempt.pad = b"t" * pad
        attempt.trailers = [(b"grpc-status", status), (b"x-pad", attempt.pad)]
        self.pump()

    @precondition(lambda self: self._answerable())
    @rule(
        data=st.data(),
        code=st.sampled_from(
            [
                h2.errors.ErrorCodes.CANCEL,
                h2.errors.ErrorCodes.REFUSED_STREAM,
                h2.errors.ErrorCodes.INTERNAL_ERROR,
            ]
        ),
    )
    def server_reset(self, data: st.DataObject, code: h2.errors.ErrorCodes) -> None:
        attempt = data.draw(st.sampled_from(self._answerable()))
        attempt.server.h2.reset_stream(attempt.stream_id, code)
        attempt.over = True
        self.pump()

    # Once per run: after it the relay may eject the only endpoint (outlier detection),
    # and the calls after it would all be the relay's UNAVAILABLE.
    @precondition(lambda self: len(self.servers) == 1 and self.servers[0].alive)
    @rule(data=st.data(), refuse_all=st.booleans())
    def server_goaway(self, data: st.DataObject, refuse_all: bool) -> None:
        """The server says GOAWAY (the streams it took, or none) and closes."""
        server = data.draw(st.sampled_from([s for s in self.servers if s.alive]))
        server.h2.close_connection(last_stream_id=0 if refuse_all else None)
        self.mesh.from_upstream(server.upstream, server.h2.data_to_send())
        server.alive = False
        server.transport.take()
        self.mesh.upstream_lost(server.upstream)
        for attempt in self.attempts.values():
            if attempt.server is server:
                attempt.over = True
        self.pump()

    @staticmethod
    def _read(conn: H2Connection, unread: dict[int, int], data: st.DataObject) -> None:
        """Reads one stream's data or everything: one stream's window stays spent while
        the connection's, credited by the others, does not."""
        streams = data.draw(st.sampled_from([[s] for s in sorted(unread)] + [sorted(unread)]))
        for stream_id in streams:
            conn.acknowledge_received_data(unread.pop(stream_id), stream_id)

    @precondition(lambda self: self.client_unread)
    @rule(data=st.data())
    def client_reads(self, data: st.DataObject) -> None:
        """The client reads what it received (until then its windows stay spent)."""
        self._read(self.client, self.client_unread, data)
        self.pump()

    @precondition(lambda self: any(s.alive and s.unread for s in self.servers))
    @rule(data=st.data())
    def server_reads(self, data: st.DataObject) -> None:
        server = data.draw(st.sampled_from([s for s in self.servers if s.alive and s.unread]))
        self._read(server.h2, server.unread, data)
        self.pump()

    @rule(from_client=st.booleans(), opaque=st.binary(min_size=8, max_size=8))
    def ping(self, from_client: bool, opaque: bytes) -> None:
        alive = [s for s in self.servers if s.alive]
        if from_client or not alive:
            self.client.ping(opaque)
        else:
            alive[0].h2.ping(opaque)
        self.pump()

    # -- invariants ----------------------------------------------------------------------

    @rule(data=st.data(), window=st.sampled_from([1000, 16_384, 65_535, 1 << 20]))
    def peer_settings(self, data: st.DataObject, window: int) -> None:
        """A peer changes its initial stream window mid-call (every open stream's moves)."""
        peers = [(self.mesh.client, self.client)] + [
            (s.upstream, s.h2) for s in self.servers if s.alive
        ]
        relay_conn, peer = data.draw(st.sampled_from(peers))
        if window < peer.local_settings.initial_window_size:
            self.lowered.add(id(relay_conn))
        peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.pump()

    @invariant()
    def windows_never_negative(self) -> None:
        conns: list[Any] = [self.mesh.client, *(s.upstream for s in self.servers if s.alive)]
        for conn in conns:
            assert conn.send_window >= 0 and conn.recv_window >= 0, conn
            for side in conn.streams.values():
                assert side.recv_window >= 0, (conn, side.id)
                assert side.send_window >= 0 or id(conn) in self.lowered, (conn, side.id)

    def teardown(self) -> None:
        try:
            if self.broken:
                return
            # Every call still open ends: the client cancels it.
            for call in self.calls.values():
                if not call.over:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.client.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
                    call.over = True
            self.pump()
            relay = self.mesh.relay
            assert not relay.exchanges, f"exchanges left: {len(relay.exchanges)}"
            assert not self.mesh.client.streams, "client streams left"
            for server in self.servers:
                assert not server.upstream.streams, "upstream streams left"
        finally:
            self.mesh.close()


#: CI runs a fixed set of examples (derandomized: the same on every run, a few seconds);
#: RELAY_H2_EXAMPLES=2000 explores that many new random ones, of 100 steps each.
_EXPLORE = int(os.environ.get("RELAY_H2_EXAMPLES", "0"))
RelayMachine.TestCase.settings = settings(
    max_examples=_EXPLORE or 80,
    stateful_step_count=100 if _EXPLORE else 50,
    derandomize=not _EXPLORE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_relay_between_h2_peers = RelayMachine.TestCase
