"""The gateway's HTTP/2 relay with real gRPC peers: flow control, cancellation, deadlines,
bad input and draining (routing itself is covered through it by test_proxy.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from gateway.app import Gateway
from mesh.proxy import frames as f
from mesh.proxy.hpack_codec import HeaderDecoder, HeaderEncoder
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings, Service, Serving
from mesh.server.testing import serve

SERVICE = "inference.GRPCInferenceService"
UNARY = f"/{SERVICE}/ModelInfer"
BIDI = f"/{SERVICE}/ModelStreamInfer"
MiB = 1 << 20


@dataclass
class Upstream:
    """A raw-bytes inference upstream: echoes reversed, streams, or holds until cancelled."""

    hold: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: list[bool] = field(default_factory=list)
    remaining: list[float | None] = field(default_factory=list)

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"hold":
            self.remaining.append(context.time_remaining())
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                # grpc cancels the handler when the call is cancelled or times out.
                self.cancelled.append(True)
                raise
        return request[::-1]

    async def bidi(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            if request.startswith(b"many:"):
                count, size = (int(x) for x in request[5:].split(b","))
                for i in range(count):
                    yield i.to_bytes(4, "big") * (size // 4)
            else:
                yield request

    def services(self) -> list[Service]:
        def register(server: grpc.aio.Server) -> None:
            server.add_generic_rpc_handlers(
                [
                    grpc.method_handlers_generic_handler(
                        SERVICE,
                        {
                            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.unary),
                            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.bidi),
                        },
                    )
                ]
            )

        return [Service(SERVICE, register)]


@dataclass
class Setup:
    upstream: Upstream
    gateway: Gateway
    serving: Serving
    channel: grpc.aio.Channel

    @property
    def unary(self) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(UNARY)

    @property
    def bidi(self) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
        return self.channel.stream_stream(BIDI)


@asynccontextmanager
async def relayed() -> AsyncIterator[Setup]:
    async with AsyncExitStack() as stack:
        upstream = Upstream()
        settings = ServerSettings(max_message_bytes=64 * MiB)
        worker, _ = await stack.enter_async_context(serve(upstream.services(), settings))
        gateway = Gateway(
            StaticDiscovery([StaticInstance("inference", "w0", worker.address)]), config_dir=None
        )
        serving = await gateway.start(ServerSettings(max_message_bytes=64 * MiB))
        options = settings.channel_options()
        channel = grpc.aio.insecure_channel(serving.address, options=options)
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while not gateway.state.snapshot.endpoints("inference"):
                assert asyncio.get_running_loop().time() < deadline, "no endpoint discovered"
                await asyncio.wait_for(gateway.endpoints_changed.wait(), timeout=10)
            yield Setup(upstream, gateway, serving, channel)
        finally:
            upstream.hold.set()
            await channel.close()
            await serving.drain(grace=0)


async def test_large_messages_cross_the_relay_whole_in_both_directions() -> None:
    """Far larger than every flow-control window on the way: the relay must pace itself."""
    async with relayed() as s:
        payload = bytes(range(256)) * (24 * MiB // 256)
        assert await s.unary(payload, timeout=60) == payload[::-1]


async def test_a_long_response_stream_arrives_complete_and_in_order() -> None:
    async with relayed() as s:
        stream = s.bidi(iter([b"many:300,65536"]), timeout=60)
        received = [message async for message in stream]
        assert len(received) == 300
        assert all(m == i.to_bytes(4, "big") * 16384 for i, m in enumerate(received))


async def test_bidirectional_messages_echo_one_by_one() -> None:
    async with relayed() as s:
        call = s.bidi()
        for i in range(50):
            await call.write(f"message {i}".encode())
            assert await call.read() == f"message {i}".encode()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK


async def test_a_client_cancel_reaches_the_upstream() -> None:
    async with relayed() as s:
        call = s.unary(b"hold")
        await until(lambda: bool(s.upstream.remaining))
        call.cancel()
        await until(lambda: bool(s.upstream.cancelled))
        assert s.upstream.cancelled == [True]
        await _settled(s)


async def test_the_deadline_is_passed_on_and_enforced() -> None:
    async with relayed() as s:
        call = s.unary(b"hold", timeout=2)
        await until(lambda: bool(s.upstream.remaining))  # the upstream holds the call
        remaining = s.upstream.remaining[0]
        # gRPC core keeps deadlines in whole milliseconds and the clocks of the two
        # processes' checks differ: allow a little over the client's 2 s.
        assert remaining is not None and 0 < remaining <= 2.05
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: bool(s.upstream.cancelled))
        await _settled(s)


async def test_non_grpc_requests_and_garbage_get_errors_and_serving_goes_on() -> None:
    async with relayed() as s:
        host, port = s.serving.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        encoder, decoder = HeaderEncoder(), HeaderDecoder()
        block = encoder.encode(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")]
        )
        writer.write(
            f.PREFACE + f.settings({}) + f.headers(1, block, end_stream=True, max_size=16384)
        )
        headers = await _read_headers(reader, decoder, stream_id=1)
        assert (b"grpc-status", b"12") in headers
        message = dict(headers)[b"grpc-message"].decode()
        assert "gRPC only" in message
        writer.close()

        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # Read to EOF: the relay answers with GOAWAY(PROTOCOL_ERROR) and closes.
        data = await asyncio.wait_for(reader.read(), timeout=10)
        kinds = {}
        pos = 0
        while pos + 9 <= len(data):
            length, kind, _, _ = f.parse_header(data, pos)
            kinds[kind] = data[pos + 9 : pos + 9 + length]
            pos += 9 + length
        assert f.parse_goaway(kinds[f.GOAWAY]) == (0, f.PROTOCOL_ERROR)
        writer.close()
        # The gateway still serves.
        assert await s.unary(b"abc", timeout=10) == b"cba"


async def test_draining_finishes_calls_in_flight_and_refuses_new_ones() -> None:
    async with relayed() as s:
        held = asyncio.ensure_future(s.unary(b"hold", timeout=30))
        await until(lambda: bool(s.upstream.remaining))
        drained = asyncio.ensure_future(s.serving.drain(grace=20))
        relay = s.gateway.relay
        assert relay is not None
        await until(lambda: relay.draining)
        s.upstream.hold.set()
        assert await held == b"dloh"
        await asyncio.wait_for(drained, timeout=20)
        with socket.socket() as probe:
            host, port = s.serving.address.rsplit(":", 1)
            assert probe.connect_ex((host, int(port))) != 0


async def _read_headers(
    reader: asyncio.StreamReader, decoder: HeaderDecoder, *, stream_id: int
) -> list[tuple[bytes, bytes]]:
    while True:
        head = await asyncio.wait_for(reader.readexactly(9), timeout=10)
        length, kind, flags, sid = f.parse_header(head, 0)
        payload = await reader.readexactly(length)
        if kind == f.HEADERS and sid == stream_id:
            assert flags & f.END_HEADERS
            return decoder.decode(payload)


async def until(condition: object, timeout: float = 10) -> None:
    """Polls ``condition`` until it holds (fails after ``timeout`` seconds)."""
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def _settled(s: Setup) -> None:
    """Every exchange has ended (none leaks after a cancel)."""
    relay = s.gateway.relay
    assert relay is not None
    await until(lambda: not relay.exchanges)


class _Counting(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        self.seen.append(handler_call_details.method)
        return await continuation(handler_call_details)


async def test_gateway_interceptors_see_its_own_services_and_the_relay_forwards_mesh_calls() -> (
    None
):
    async with AsyncExitStack() as stack:
        upstream = Upstream()
        worker, _ = await stack.enter_async_context(serve(upstream.services()))
        counting = _Counting()
        gateway = Gateway(
            StaticDiscovery([StaticInstance("inference", "w0", worker.address)]),
            config_dir=None,
            interceptors=[counting],
        )
        serving = await gateway.start(ServerSettings())
        stack.push_async_callback(serving.drain, 0)
        assert gateway.relay is not None
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(serving.address))
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        await until(lambda: bool(gateway.state.snapshot.endpoints("inference")))
        assert await call(b"abc", timeout=10) == b"cba"
        # A mesh call never reaches the gateway's gRPC server; its own services do.
        assert counting.seen == []
        health: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/grpc.health.v1.Health/Check"
        )
        await health(b"", timeout=10)
        assert counting.seen == ["/grpc.health.v1.Health/Check"]
