"""The relay against a raw HTTP/2 client: protocol edge cases a gRPC client never produces
(oversized header lists, a client that stops granting window) and draining around them."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gateway.app import Gateway
from mesh.proxy import frames as f
from mesh.proxy.connection import CONTROL_FRAMES_PER_SECOND, MAX_STREAMS
from mesh.proxy.downstream import PREMATURE_RESETS
from mesh.proxy.hpack_codec import Header, HeaderDecoder, HeaderEncoder
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings, Service, Serving
from mesh.server.testing import serve
from tests.gateway.test_relay import (
    BIDI,
    SERVICE,
    UNARY,
    MiB,
    Upstream,
    relayed,
    until,
)

#: A second loopback address: the relay's per-source limits tell it from 127.0.0.1.
ABUSER = "127.0.0.2"


class RawClient:
    """One HTTP/2 client connection written frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = HeaderEncoder(), HeaderDecoder()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def request(
        self, stream_id: int, path: str, extra: Sequence[Header] = (), *, end: bool
    ) -> None:
        block = self.encoder.encode(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", b"gateway"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *extra,
            ]
        )
        self.send(f.headers(stream_id, block, end_stream=end, max_size=f.MIN_MAX_FRAME_SIZE))

    def message(self, stream_id: int, payload: bytes, *, end: bool) -> None:
        body = b"\x00" + len(payload).to_bytes(4, "big") + payload
        self.send(f.frame(f.DATA, f.END_STREAM if end else 0, stream_id, body))

    async def next_frame(self, timeout: float = 10) -> tuple[int, int, int, bytes] | None:
        """(type, flags, stream id, payload), or None at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
            length, kind, flags, stream_id = f.parse_header(head, 0)
            payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        if kind == f.HEADERS:
            assert flags & f.END_HEADERS
            payload = b"".join(b"%s: %s\n" % h for h in self.decoder.decode(payload))
        return kind, flags, stream_id, payload

    async def until_end(self, stream_id: int) -> tuple[bytes, bytes | None]:
        """The response DATA of ``stream_id`` and its final header block (None: the stream
        or the connection ended without one)."""
        data = bytearray()
        while True:
            got = await self.next_frame()
            if got is None:
                return bytes(data), None
            kind, flags, sid, payload = got
            if kind == f.GOAWAY and f.parse_goaway(payload)[1] != f.NO_ERROR:
                return bytes(data), None
            if sid != stream_id:
                continue
            if kind == f.DATA:
                data += payload
            elif kind == f.RST_STREAM:
                return bytes(data), None
            elif kind == f.HEADERS and flags & f.END_STREAM:
                return bytes(data), payload


@asynccontextmanager
async def connect_raw(
    address: str,
    settings: dict[int, int] | None = None,
    *,
    source: str | None = None,
    preface: bool = True,
) -> AsyncIterator[RawClient]:
    """A raw connection to the relay at ``address``, closed on the way out. ``source``:
    another loopback address to connect from (a client the relay tells apart from the
    test's gRPC channel, on 127.0.0.1); ``preface``: False to send nothing at all, for a
    test about a client that never opens properly."""
    host, port = address.rsplit(":", 1)
    local = (source, 0) if source is not None else None
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=local)
    client = RawClient(reader, writer)
    if preface:
        client.send(f.PREFACE + f.settings(settings or {}))
    try:
        yield client
    finally:
        writer.close()


async def test_an_oversized_header_list_fails_its_stream_not_the_connection() -> None:
    """RFC 9113 §10.5.1: a header list over SETTINGS_MAX_HEADER_LIST_SIZE is the one
    stream's problem; the other calls multiplexed on the connection go on."""
    async with relayed() as s, connect_raw(s.serving.address) as client:
        big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(80)]  # ~80 KiB > 64 KiB
        client.request(1, UNARY, big, end=True)
        client.request(3, UNARY, end=False)
        client.message(3, b"abc", end=True)
        _, first = await client.until_end(1)
        assert first is not None and b"grpc-status: 8\n" in first  # RESOURCE_EXHAUSTED
        assert re.search(rb"^x-request-id: [0-9a-f]{32}$", first, flags=re.MULTILINE)
        data, trailers = await client.until_end(3)
        assert trailers is not None and b"grpc-status: 0\n" in trailers
        assert data.endswith(b"cba")


async def test_draining_delivers_responses_still_queued_for_a_slow_client() -> None:
    """A call whose upstream has finished can still be queued for the client's window;
    draining waits for it as for a call in flight (the client would see a cut response)."""
    async with relayed() as s, connect_raw(s.serving.address) as client:
        relay = s.gateway.relay
        assert relay is not None
        client.request(1, BIDI, end=False)
        client.message(1, b"many:4,65536", end=True)  # 256 KiB > the 64 KiB default window
        # The upstream's trailers are in, queued behind data the window holds back.
        await until(
            lambda: any(
                side.queue and side.exchange.done
                for conn in relay.downstreams
                for side in conn.streams.values()
            )
        )
        drained = asyncio.ensure_future(s.serving.drain(grace=20))
        await until(lambda: relay.draining)
        client.send(f.window_update(0, 1 << 20) + f.window_update(1, 1 << 20))
        data, trailers = await client.until_end(1)
        assert trailers is not None and b"grpc-status: 0\n" in trailers
        assert len(data) == 4 * (5 + 65536)
        await asyncio.wait_for(drained, timeout=20)


async def test_an_upstreams_max_concurrent_streams_is_respected() -> None:
    """An upstream that allows 2 concurrent streams refuses a third on the same connection
    (RST_STREAM REFUSED_STREAM); calls beyond its limit must not fail for it."""
    upstream = Upstream()
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 2)])
    for service in upstream.services():
        service.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gateway = Gateway(
        StaticDiscovery([StaticInstance("inference", "w0", f"127.0.0.1:{port}")]),
        config_dir=None,
    )
    serving = await gateway.start(ServerSettings())
    channel = grpc.aio.insecure_channel(serving.address)
    try:
        await until(lambda: bool(gateway.state.snapshot.endpoints("inference")))
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        assert await unary(b"abc", timeout=10) == b"cba"  # the upstream's SETTINGS are in
        held = [asyncio.ensure_future(unary(b"hold", timeout=30)) for _ in range(4)]
        await until(lambda: len(upstream.remaining) >= 2 or any(c.done() for c in held))
        upstream.hold.set()
        assert await asyncio.gather(*held) == [b"dloh"] * 4
    finally:
        upstream.hold.set()
        await channel.close()
        await serving.drain(grace=0)
        await server.stop(0)


async def test_a_client_that_grants_window_but_never_reads_does_not_grow_the_relay() -> None:
    """Windows bound what the relay may send, not what it buffers: a client advertising
    2^31-1 that never reads must see the relay stop at its socket (pause_writing) and hold
    the rest in the upstream's flow-control window, not in an unbounded write buffer."""
    huge = f.MAX_WINDOW
    async with (
        relayed() as s,
        connect_raw(s.serving.address, {f.INITIAL_WINDOW_SIZE: huge}) as client,
    ):
        relay = s.gateway.relay
        assert relay is not None
        client.send(f.window_update(0, huge - f.DEFAULT_WINDOW))
        client.request(1, BIDI, end=False)
        client.message(1, b"many:480,65536", end=True)  # 30 MiB, never read

        def buffered() -> int:
            return sum(
                conn.transport.get_write_buffer_size()
                for conn in relay.downstreams
                if conn.transport is not None
            )

        def held_back() -> bool:
            return any(side.queue for conn in relay.downstreams for side in conn.streams.values())

        await until(lambda: held_back() or buffered() > 8 * MiB, timeout=30)
        assert buffered() <= 8 * MiB


@asynccontextmanager
async def gateway_to_black_hole() -> AsyncIterator[Serving]:
    """A gateway whose one upstream accepts connections and never reads or answers."""
    accepted: list[asyncio.StreamWriter] = []

    async def black_hole(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    gateway = Gateway(
        StaticDiscovery([StaticInstance("inference", "w0", f"127.0.0.1:{port}")]),
        config_dir=None,
    )
    serving = await gateway.start(ServerSettings())
    try:
        await until(lambda: bool(gateway.state.snapshot.endpoints("inference")))
        yield serving
    finally:
        await serving.drain(grace=0)
        for writer in accepted:
            writer.close()
        hole.close()


async def test_a_client_overrunning_its_window_is_stopped() -> None:
    """RFC 9113 §6.9.1: DATA past the window the relay advertised is a FLOW_CONTROL_ERROR.
    Without the check, a client could make the relay queue without bound for an upstream
    that does not read."""
    async with gateway_to_black_hole() as serving:
        async with connect_raw(serving.address) as client:
            client.request(1, BIDI, end=False)
            chunk = f.frame(f.DATA, 0, 1, bytes(f.MIN_MAX_FRAME_SIZE))
            # One frame past the 1 MiB stream window (and no more, so that the relay has read
            # everything when it closes: unread input would turn its close into a reset).
            for _ in range(MiB // f.MIN_MAX_FRAME_SIZE + 1):
                client.send(chunk)
            error = None
            while error is None:
                got = await client.next_frame()
                assert got is not None, "connection closed without an error"
                kind, _, stream_id, payload = got
                if kind == f.GOAWAY:
                    error = f.parse_goaway(payload)[1]
                elif kind == f.RST_STREAM and stream_id == 1:
                    error = f.parse_u32(payload)
            assert error == f.FLOW_CONTROL_ERROR


async def test_streams_past_the_advertised_concurrency_limit_are_refused() -> None:
    """The relay advertises SETTINGS_MAX_CONCURRENT_STREAMS; a client opening more gets
    REFUSED_STREAM (RFC 9113 §5.1.2), which bounds what one connection can make it hold."""
    async with gateway_to_black_hole() as serving:
        async with connect_raw(serving.address) as client:
            for i in range(MAX_STREAMS + 1):
                client.request(1 + 2 * i, BIDI, end=False)
            last = 1 + 2 * MAX_STREAMS
            while True:
                got = await client.next_frame()
                assert got is not None, "connection closed"
                kind, _, stream_id, payload = got
                if kind == f.RST_STREAM and stream_id == last:
                    assert f.parse_u32(payload) == f.REFUSED_STREAM
                    break
                assert kind != f.RST_STREAM, f"stream {stream_id} reset"
                assert kind != f.GOAWAY


async def test_streams_a_client_stops_reading_do_not_stall_other_calls() -> None:
    """RFC 9113 §5.2.2: an intermediary that credits its connection window only as each
    stream's data is written on lets a few stalled streams hold the whole upstream
    connection's window; every other call to that upstream, from any client, then hangs."""
    async with relayed() as s, connect_raw(s.serving.address) as client:
        relay = s.gateway.relay
        assert relay is not None
        client.send(f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW))
        # 20 streams that never grant more than the default 64 KiB stream window, each
        # asking for 2 MiB: together past the relay's 16 MiB upstream connection window.
        for i in range(20):
            client.request(1 + 2 * i, BIDI, end=False)
            client.message(1 + 2 * i, b"many:32,65536", end=True)

        def queued() -> int:
            return sum(
                len(item[0])
                for conn in relay.downstreams
                for side in conn.streams.values()
                for item in side.queue
            )

        await until(lambda: queued() > 14 * MiB, timeout=30)
        assert await s.unary(b"abc", timeout=10) == b"cba"


_SLOW_CONNECT_CONFIG = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - name: all
      retries: {attempts: 1, retryOn: connect-failure}
      route: [{destination: {host: inference}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {connectTimeout: 300ms}}
"""


async def test_connect_timeout_fails_over_from_an_endpoint_that_never_accepts(
    tmp_path: Path,
) -> None:
    """connectionPool.tcp.connectTimeout bounds a connect to a host that drops SYNs (here a
    listener with a full accept queue); the call then goes to the next endpoint instead of
    hanging until its deadline with every other call to that host."""
    (tmp_path / "inference.yaml").write_text(_SLOW_CONNECT_CONFIG)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:  # fill the accept queue: later SYNs are dropped
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
    hung = f"127.0.0.1:{full.getsockname()[1]}"
    upstream = Upstream()
    async with serve(upstream.services()) as (worker, _):
        gateway = Gateway(
            StaticDiscovery(
                [
                    StaticInstance("inference", "hung", hung),
                    StaticInstance("inference", "w1", worker.address),
                ]
            ),
            config_dir=tmp_path,
        )
        serving = await gateway.start(ServerSettings())
        channel = grpc.aio.insecure_channel(serving.address)
        try:
            await until(lambda: len(gateway.state.snapshot.endpoints("inference")) == 2)
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
            for _ in range(4):  # round robin: some go to the hung endpoint first
                assert await unary(b"abc", timeout=5) == b"cba"
        finally:
            await channel.close()
            await serving.drain(grace=0)
            for sock in (full, *fillers):
                sock.close()


async def test_a_connection_retired_while_it_connects_closes_once_up() -> None:
    """An address that leaves the mesh (``retain``) while its connection is still being
    opened: the connection, unused, must close when it comes up, not linger until the
    gateway stops."""
    closed = asyncio.Event()

    async def until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # to EOF: the relay's preface and SETTINGS, then its close
        closed.set()
        writer.close()

    server = await asyncio.start_server(until_eof, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with relayed() as s:
        relay = s.gateway.relay
        assert relay is not None
        conn = relay.pool.get(address, connect_timeout=10)
        relay.pool.retain([])  # before the connect task has even run
        await until(lambda: conn.connected)
        await asyncio.wait_for(closed.wait(), timeout=10)
    server.close()


async def test_data_after_the_clients_end_stream_resets_the_stream() -> None:
    """RFC 9113 §5.1: a stream the client half-closed (END_STREAM) takes no more DATA;
    that is a stream error STREAM_CLOSED, not more request bytes to forward upstream."""
    async with relayed() as s, connect_raw(s.serving.address) as client:
        client.request(1, UNARY, end=False)
        client.message(1, b"hold", end=True)
        await until(lambda: bool(s.upstream.remaining))
        client.message(1, b"more", end=False)
        while True:
            got = await client.next_frame()
            assert got is not None, "connection closed"
            kind, _, stream_id, payload = got
            if stream_id == 1:
                break
        assert (kind, f.parse_u32(payload)) == (f.RST_STREAM, f.STREAM_CLOSED)
        await until(lambda: bool(s.upstream.cancelled))  # the upstream call is cancelled


async def test_an_oversized_response_header_list_fails_its_call_not_the_upstream() -> None:
    """The same on the upstream side: response headers over the relay's limit fail that
    call; the other calls on the pooled upstream connection go on."""
    release = asyncio.Event()

    async def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"big":
            await context.send_initial_metadata(
                tuple((f"x-big-{i}", "v" * 1000) for i in range(80))  # ~80 KiB > 64 KiB
            )
        elif request == b"hold":
            await release.wait()
        return request[::-1]

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(handler)}
                )
            ]
        )

    async with serve([Service(SERVICE, register)]) as (worker, _):
        gateway = Gateway(
            StaticDiscovery([StaticInstance("inference", "w0", worker.address)]), config_dir=None
        )
        serving = await gateway.start(ServerSettings())
        channel = grpc.aio.insecure_channel(serving.address)
        try:
            await until(lambda: bool(gateway.state.snapshot.endpoints("inference")))
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
            held = asyncio.ensure_future(unary(b"hold", timeout=10))
            relay = gateway.relay
            assert relay is not None
            await until(lambda: bool(relay.exchanges))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(b"big", timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            release.set()
            assert await held == b"dloh"
        finally:
            release.set()
            await channel.close()
            await serving.drain(grace=0)


async def _goaway_code(client: RawClient) -> int | None:
    """Reads to the relay's GOAWAY (its error code) or EOF (None)."""
    while True:
        got = await client.next_frame()
        if got is None:
            return None
        kind, _, _, payload = got
        if kind == f.GOAWAY:
            return f.parse_goaway(payload)[1]


async def test_a_ping_flood_is_answered_with_goaway_and_a_cool_off() -> None:
    async with relayed() as s:
        async with connect_raw(s.serving.address, source=ABUSER) as client:
            # With the opening SETTINGS, one frame over the limit, and none after it (bytes
            # arriving after the close would reset the connection before GOAWAY is read).
            client.send(f.frame(f.PING, 0, 0, b"12345678") * CONTROL_FRAMES_PER_SECOND)
            assert await _goaway_code(client) == f.ENHANCE_YOUR_CALM
        # The abuser reconnecting is refused for the cool-off...
        async with connect_raw(s.serving.address, source=ABUSER) as client:
            assert await _goaway_code(client) == f.ENHANCE_YOUR_CALM
        # ...while other clients are served.
        assert await s.unary(b"abc", timeout=10) == b"cba"


@pytest.mark.parametrize(
    "flood",
    [
        [f.frame(f.DATA, 0, 1, b"")],
        [f.frame(f.DATA, f.PADDED, 1, b"\x02\x00\x00")],  # padding only
        [f.frame(f.PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10")],
        [f.frame(0x77, 0, 0, b"")],  # an unknown type
    ],
    ids=["empty DATA", "padding-only DATA", "PRIORITY", "unknown type"],
)
async def test_a_flood_of_frames_that_carry_nothing_is_answered_with_goaway(
    flood: list[bytes],
) -> None:
    """CVE-2019-9518 ("empty frames flood"): frames with nothing to relay cost the relay a
    parse each and no flow-control window, so one connection could send them at line
    rate. Measured before the limit (loaded machine): other clients' median unary latency
    went from 2 ms to 110-310 ms while one connection sent them."""
    async with relayed() as s:
        async with connect_raw(s.serving.address, source=ABUSER) as client:
            client.request(1, BIDI, end=False)
            client.send(b"".join(flood) * (CONTROL_FRAMES_PER_SECOND + 1))
            assert await _goaway_code(client) == f.ENHANCE_YOUR_CALM
        assert await s.unary(b"abc", timeout=10) == b"cba"


async def test_an_empty_continuation_flood_is_answered_with_goaway() -> None:
    async with relayed() as s:
        async with connect_raw(s.serving.address, source=ABUSER) as client:
            block = client.encoder.encode([(b":method", b"POST")])
            client.send(f.frame(f.HEADERS, 0, 1, block))
            client.send(f.frame(f.CONTINUATION, 0, 1, b"") * (CONTROL_FRAMES_PER_SECOND + 1))
            assert await _goaway_code(client) == f.ENHANCE_YOUR_CALM


async def test_rapid_reset_is_answered_with_goaway_and_a_few_cancels_are_not() -> None:
    """HTTP/2 "rapid reset" (CVE-2023-44487): streams opened and reset at once."""
    async with relayed() as s:
        async with connect_raw(s.serving.address, source=ABUSER) as client:
            # A few cancelled calls, then one that completes: a normal client.
            for sid in range(1, 21, 2):
                client.request(sid, UNARY, end=False)
                client.send(f.rst_stream(sid, f.CANCEL))
            client.request(21, UNARY, end=False)
            client.message(21, b"abc", end=True)
            _, trailers = await client.until_end(21)
            assert trailers is not None and b"grpc-status: 0\n" in trailers
            # Now open-and-reset, fast, until the check applies (the 10 above count). Sent
            # exactly up to it: bytes still arriving after the relay closes would make the
            # kernel reset the connection before the GOAWAY is read.
            for sid in range(23, 23 + 2 * (PREMATURE_RESETS - 10), 2):
                client.request(sid, UNARY, end=False)
                client.send(f.rst_stream(sid, f.CANCEL))
            assert await _goaway_code(client) == f.ENHANCE_YOUR_CALM
        # Reconnecting at once is refused (cool-off): the abuse costs the abuser.
        async with connect_raw(s.serving.address, source=ABUSER) as again:
            assert await _goaway_code(again) == f.ENHANCE_YOUR_CALM
        relay = s.gateway.relay
        assert relay is not None
        await until(lambda: not relay.exchanges)  # the reset calls left nothing behind
        assert relay.limiter.refused == {"cool_off": 1}
        assert await s.unary(b"abc", timeout=10) == b"cba"


async def test_a_stream_the_only_endpoint_goaways_is_sent_again_on_a_fresh_connection() -> None:
    """A server rotating its connections GOAWAYs streams it never ran; with one endpoint
    there is no successor, so the relay retries on a new connection, as gRPC clients do."""
    connections: list[int] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        first = len(connections) == 1
        encoder, decoder = HeaderEncoder(), HeaderDecoder()
        try:
            await reader.readexactly(len(f.PREFACE))
            writer.write(f.settings({}))
            body = bytearray()
            while True:
                head = await reader.readexactly(9)
                length, kind, flags, sid = f.parse_header(head, 0)
                payload = await reader.readexactly(length)
                if kind == f.SETTINGS and not flags & f.ACK:
                    writer.write(f.SETTINGS_ACK)
                elif kind == f.HEADERS:
                    decoder.decode(payload)
                    if first:  # "never ran it": the relay must try elsewhere
                        writer.write(f.goaway(0, f.NO_ERROR))
                elif kind == f.DATA and not first:
                    body += payload
                    if flags & f.END_STREAM:  # echo the one gRPC message back
                        ok = [(b":status", b"200"), (b"content-type", b"application/grpc")]
                        writer.write(
                            f.headers(sid, encoder.encode(ok), end_stream=False, max_size=16384)
                            + f.frame(f.DATA, 0, sid, bytes(body))
                            + f.headers(
                                sid,
                                encoder.encode([(b"grpc-status", b"0")]),
                                end_stream=True,
                                max_size=16384,
                            )
                        )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = Gateway(
        StaticDiscovery([StaticInstance("inference", "w0", f"127.0.0.1:{port}")]), config_dir=None
    )
    serving = await gateway.start(ServerSettings())
    channel = grpc.aio.insecure_channel(serving.address)
    try:
        await until(lambda: bool(gateway.state.snapshot.endpoints("inference")))
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        assert await unary(b"abc", timeout=10) == b"abc"
        assert len(connections) == 2
    finally:
        await channel.close()
        await serving.drain(grace=0)
        server.close()
        await server.wait_closed()


async def test_a_unary_call_whose_upstream_dies_mid_response_is_retried() -> None:
    """The relay holds a unary response until its trailers: an upstream killed after its
    response headers is retried on the successor, as one killed before them is."""
    requests: list[int] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        encoder, decoder = HeaderEncoder(), HeaderDecoder()
        try:
            await reader.readexactly(len(f.PREFACE))
            writer.write(f.settings({}))
            body = bytearray()
            while True:
                head = await reader.readexactly(9)
                length, kind, flags, sid = f.parse_header(head, 0)
                payload = await reader.readexactly(length)
                if kind == f.SETTINGS and not flags & f.ACK:
                    writer.write(f.SETTINGS_ACK)
                elif kind == f.HEADERS:
                    decoder.decode(payload)
                elif kind == f.DATA:
                    body += payload
                    if not flags & f.END_STREAM:
                        continue
                    requests.append(sid)
                    ok = [(b":status", b"200"), (b"content-type", b"application/grpc")]
                    writer.write(
                        f.headers(sid, encoder.encode(ok), end_stream=False, max_size=16384)
                    )
                    if len(requests) == 1:  # the first call of all: die mid-response
                        await writer.drain()
                        writer.transport.abort()
                        return
                    writer.write(
                        f.frame(f.DATA, 0, sid, bytes(body))
                        + f.headers(
                            sid,
                            encoder.encode([(b"grpc-status", b"0")]),
                            end_stream=True,
                            max_size=16384,
                        )
                    )
                    body.clear()
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            writer.close()

    servers = [await asyncio.start_server(upstream, "127.0.0.1", 0) for _ in range(2)]
    instances = [
        StaticInstance("inference", f"w{i}", f"127.0.0.1:{s.sockets[0].getsockname()[1]}")
        for i, s in enumerate(servers)
    ]
    gateway = Gateway(StaticDiscovery(instances), config_dir=None)
    serving = await gateway.start(ServerSettings())
    channel = grpc.aio.insecure_channel(serving.address)
    try:
        await until(lambda: len(gateway.state.snapshot.endpoints("inference")) == 2)
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        assert await unary(b"abc", timeout=10) == b"abc"
        assert len(requests) == 2  # the dead one, then the successor
    finally:
        await channel.close()
        await serving.drain(grace=0)
        for server in servers:
            server.close()
            await server.wait_closed()


async def _first_error(client: RawClient, stream_id: int) -> tuple[str, int] | None:
    """("stream", code) for an RST_STREAM on ``stream_id``, ("connection", code) for a
    GOAWAY with an error; None: the connection ended without either."""
    while True:
        got = await client.next_frame()
        if got is None:
            return None
        kind, _, sid, payload = got
        if kind == f.GOAWAY and f.parse_goaway(payload)[1] != f.NO_ERROR:
            return "connection", f.parse_goaway(payload)[1]
        if kind == f.RST_STREAM and sid == stream_id:
            return "stream", f.parse_u32(payload)


@pytest.mark.parametrize(
    "overflow",
    [
        [f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW), f.window_update(0, 1)],
        [f.window_update(1, 10), f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})],
    ],
    ids=["connection window", "stream window by SETTINGS"],
)
async def test_a_window_past_the_largest_is_a_connection_flow_control_error(
    overflow: list[bytes],
) -> None:
    """RFC 9113 §6.9.1-2: a WINDOW_UPDATE that takes the connection's window past 2^31-1,
    or a SETTINGS_INITIAL_WINDOW_SIZE that takes a stream's there, is a connection
    FLOW_CONTROL_ERROR. The relay added it up and went on."""
    async with relayed() as s, connect_raw(s.serving.address) as client:
        client.request(1, BIDI, end=False)
        client.send(b"".join(overflow))
        assert await _first_error(client, 1) == ("connection", f.FLOW_CONTROL_ERROR)


async def test_a_stream_window_past_the_largest_fails_that_stream_only() -> None:
    async with relayed() as s, connect_raw(s.serving.address) as client:
        client.request(1, BIDI, end=False)
        client.send(f.window_update(1, f.MAX_WINDOW))
        assert await _first_error(client, 1) == ("stream", f.FLOW_CONTROL_ERROR)
        # The connection goes on serving.
        client.request(3, UNARY, end=False)
        client.message(3, b"abc", end=True)
        data, trailers = await client.until_end(3)
        assert trailers is not None and b"grpc-status: 0\n" in trailers
        assert data.endswith(b"cba")
