"""The HTTP/2 front: hot methods served on the relay's engine behave as on grpc.aio.

Real grpc.aio clients against a real front (mesh/server/h2_front.py) on port 0 or a Unix
socket, with the grpc.aio server behind it on its private socket.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.errors import NotFound
from mesh.header_limits import HOP_ALLOWANCE, INBOUND_HEADER_LIST, MAX_SERVER_METADATA
from mesh.server.app import ServerSettings, Serving
from mesh.server.call_context import CallContext
from mesh.server.h2_front import HotMethod, start_fronted_server
from mesh.server.sidecar_secret import HEADER, new_secret

ECHO = "/meshserve.test.Front/Echo"
CHAT = "/meshserve.test.Front/Chat"


@dataclass
class Probe:
    """Hot methods whose behaviour the request body chooses."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[tuple[tuple[str, str | bytes], ...]] = field(default_factory=list)

    async def echo(self, request: bytes, context: Any) -> bytes:
        metadata = context.invocation_metadata()
        self.seen.append(metadata)
        tag = next((v for k, v in metadata if k == "x-tag"), "")
        context.set_trailing_metadata((("x-echo", str(tag)),))
        if request == b"missing":
            raise NotFound("no such thing")
        if request == b"crash":
            raise RuntimeError("secret path /etc/shadow")
        if request == b"wait":
            self.entered.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return request[::-1]

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.upper()

    def methods(self) -> list[HotMethod]:
        same: Callable[[Any], bytes] = bytes
        return [
            HotMethod(ECHO, bytes, same, self.echo),
            HotMethod(CHAT, bytes, same, self.chat, streaming=True),
        ]


@asynccontextmanager
async def front(
    probe: Probe, settings: ServerSettings | None = None
) -> AsyncIterator[tuple[Serving, grpc.aio.Channel]]:
    serving = await start_fronted_server(settings or ServerSettings(), [], probe.methods())
    channel = grpc.aio.insecure_channel(serving.address, options=serving.settings.channel_options())
    try:
        yield serving, channel
    finally:
        await channel.close()
        await serving.drain(grace=0)


def echo(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
    return method


async def wait_for(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), timeout=10)


async def test_unary_call_with_metadata_trailers_and_compression() -> None:
    probe = Probe()
    async with front(probe) as (_, channel):
        binary = b"\x00\xffraw"
        call = echo(channel)(
            b"hello", metadata=(("x-tag", "t1"), ("x-raw-bin", binary)), timeout=10
        )
        assert await call == b"olleh"
        assert ("x-echo", "t1") in tuple(await call.trailing_metadata() or ())
        assert ("x-tag", "t1") in probe.seen[-1]
        assert ("x-raw-bin", binary) in probe.seen[-1]
        for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            body = b"compress me " * 100
            assert await echo(channel)(body, compression=compression, timeout=10) == body[::-1]


async def test_messages_of_many_frames_both_ways_in_concurrent_calls() -> None:
    async with front(Probe()) as (_, channel):
        bodies = [bytes(range(256)) * (4096 * n) for n in (1, 3, 5)]  # 1, 3 and 5 MiB
        answers = await asyncio.gather(*(echo(channel)(b, timeout=60) for b in bodies))
        assert answers == [b[::-1] for b in bodies]


async def test_errors_map_to_their_status_without_leaking_internals() -> None:
    async with front(Probe()) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await echo(channel)(b"missing", timeout=10)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == "no such thing"
        with pytest.raises(grpc.aio.AioRpcError) as crash:
            await echo(channel)(b"crash", timeout=10)
        assert crash.value.code() is grpc.StatusCode.INTERNAL
        assert "internal error (ref " in (crash.value.details() or "")
        assert "shadow" not in (crash.value.details() or "")


async def test_a_message_over_the_limit_is_resource_exhausted() -> None:
    settings = ServerSettings(max_message_bytes=1024)
    async with front(Probe(), settings) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await echo(channel)(b"x" * 4096, timeout=10)
        assert big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # The connection and the front live on.
        assert await echo(channel)(b"ok", timeout=10) == b"ko"


async def test_the_deadline_ends_the_call_and_cancels_its_handler() -> None:
    probe = Probe()
    async with front(probe) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await echo(channel)(b"wait", timeout=0.3)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(probe.cancelled)


async def test_a_client_cancel_cancels_the_handler() -> None:
    probe = Probe()
    async with front(probe) as (_, channel):
        call = echo(channel)(b"wait", timeout=30)
        await wait_for(probe.entered)
        call.cancel()
        await wait_for(probe.cancelled)
        assert await echo(channel)(b"after", timeout=10) == b"retfa"


async def test_a_stream_answers_each_message_in_order() -> None:
    async with front(Probe()) as (_, channel):
        chat: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(CHAT)

        async def messages() -> AsyncIterator[bytes]:
            for word in (b"one", b"two", b"three"):
                yield word

        answers = [a async for a in chat(messages(), timeout=10)]
        assert answers == [b"ONE", b"TWO", b"THREE"]


async def test_other_methods_reach_the_grpc_server_behind_the_front() -> None:
    async with front(Probe()) as (_, channel):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            nobody: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/meshserve.test.Nobody/Call"
            )
            await nobody(b"", timeout=10)
        assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_the_sidecar_secret_guards_hot_and_relayed_methods() -> None:
    secret = new_secret()
    async with front(Probe(), ServerSettings(sidecar_secret=secret)) as (_, channel):
        health = health_pb2_grpc.HealthStub(channel)
        for wrong in ((), ((HEADER, "x" * len(secret)),)):
            with pytest.raises(grpc.aio.AioRpcError) as hot:
                await echo(channel)(b"hi", metadata=wrong, timeout=10)
            assert hot.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as relayed:
                await health.Check(health_pb2.HealthCheckRequest(), metadata=wrong, timeout=10)
            assert relayed.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert await echo(channel)(b"hi", metadata=((HEADER, secret),), timeout=10) == b"ih"


async def test_a_drain_lets_calls_in_flight_finish_and_refuses_new_ones() -> None:
    probe = Probe()
    async with front(probe) as (serving, channel):
        call = echo(channel)(b"wait", timeout=30)
        await wait_for(probe.entered)
        drain = asyncio.create_task(serving.drain(grace=10))
        async with grpc.aio.insecure_channel(serving.address) as late:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo(late)(b"new", timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        probe.release.set()
        assert await call == b"tiaw"
        await asyncio.wait_for(drain, timeout=20)


async def test_the_front_listens_on_a_unix_socket(tmp_path: Path) -> None:
    socket = tmp_path / "front.sock"
    async with front(Probe(), ServerSettings(host=f"unix:{socket}")) as (serving, channel):
        assert serving.address == f"unix:{socket}"
        assert await echo(channel)(b"abc", timeout=10) == b"cba"


async def test_binary_metadata_is_decoded_as_grpc_does() -> None:
    # grpc sends -bin values unpadded base64; the context pads them back.
    encoded = base64.b64encode(b"\x01\x02").rstrip(b"=")
    headers = [(b":path", b"/a/b"), (b"k-bin", encoded), (b"te", b"trailers"), (b"k", b"v")]
    context = CallContext(headers, None, asyncio.get_running_loop())
    assert context.invocation_metadata() == (("k-bin", b"\x01\x02"), ("k", "v"))
    assert context.time_remaining() is None


async def test_the_front_and_the_server_behind_it_accept_what_the_inbound_forwards() -> None:
    """A worker sits behind its sidecar's inbound, which accepts INBOUND_HEADER_LIST and
    adds to it: hot methods (the front) and relayed ones (grpc.aio behind it) take both."""
    big = (("x-big", "v" * (INBOUND_HEADER_LIST + HOP_ALLOWANCE // 2)),)
    async with front(Probe()) as (_, channel):
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
        health = health_pb2_grpc.HealthStub(channel)
        assert await echo(b"ab", timeout=10) == b"ba"  # grpc-core's limits follow SETTINGS
        assert await echo(b"ab", metadata=big, timeout=10) == b"ba"
        request = health_pb2.HealthCheckRequest()
        reply = await health.Check(request, metadata=big, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        over = (("x-big", "v" * MAX_SERVER_METADATA),)
        for call in (
            echo(b"ab", metadata=over, timeout=10),
            health.Check(request, metadata=over, timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
