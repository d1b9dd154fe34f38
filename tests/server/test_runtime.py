"""Every server's shared runtime: health, reflection, error mapping, limits, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from mesh import errors
from mesh.server.app import ServerSettings, Service, start_server
from mesh.server.testing import serve

SERVICE = "meshserve.test.Probe"


class Probe:
    """A raw-bytes service whose behaviour is chosen by the request body."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"invalid":
            raise errors.InvalidArgument("field 'x' must be positive, got -1")
        if request == b"crash":
            raise RuntimeError("secret path /etc/shadow")
        if request == b"slow":
            self.entered.set()
            await self.release.wait()
        return request

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        yield b"first"
        raise errors.NotFound(f"dataset {request.decode()!r} not found")

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                        "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                    },
                )
            ]
        )


def unary(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"/{SERVICE}/Unary"
    )
    return method


def probe_service(probe: Probe) -> Service:
    return Service(SERVICE, probe.register)


async def test_health_reports_serving_for_server_and_services() -> None:
    async with serve([probe_service(Probe())]) as (_, channel):
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_server_started_not_serving_says_so_until_it_is_ready() -> None:
    # A worker that loads models first: its sidecar must not register it SERVING early.
    serving = await start_server(ServerSettings(), [probe_service(Probe())], serving=False)
    try:
        async with grpc.aio.insecure_channel(serving.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await serving.set_serving(True)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await serving.drain(grace=0)


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
async def test_reflection_lists_services_under_both_versions(path: str) -> None:
    async with serve([probe_service(Probe())]) as (_, channel):
        call = channel.stream_stream(
            path,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

        async def one_request() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for response in call(one_request()):
            names |= {s.name for s in response.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names


async def test_domain_error_maps_to_its_status_with_message() -> None:
    async with serve([probe_service(Probe())]) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel)(b"invalid")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'x' must be positive" in (info.value.details() or "")


async def test_unexpected_error_is_internal_and_leaks_nothing() -> None:
    async with serve([probe_service(Probe())]) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel)(b"crash")
        assert info.value.code() == grpc.StatusCode.INTERNAL
        details = info.value.details() or ""
        assert details.startswith("internal error (ref ")
        assert "shadow" not in details
        # The server keeps serving after a bug in one call.
        assert await unary(channel)(b"ok") == b"ok"


async def test_error_mid_stream_keeps_earlier_messages() -> None:
    async with serve([probe_service(Probe())]) as (_, channel):
        stream = cast(
            "grpc.aio.UnaryStreamMultiCallable[bytes, bytes]",
            channel.unary_stream(f"/{SERVICE}/Stream"),
        )
        call = stream(b"digits")
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'digits'" in (info.value.details() or "")


async def test_message_over_limit_is_resource_exhausted() -> None:
    settings = ServerSettings(max_message_bytes=64 * 1024)
    async with serve([probe_service(Probe())], settings) as (serving, _):
        # A client with a larger limit, so the server's limit is the one hit.
        async with grpc.aio.insecure_channel(serving.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(channel)(b"x" * (128 * 1024))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await unary(channel)(b"x" * 1024) == b"x" * 1024


async def test_raised_default_limit_accepts_messages_over_four_mib() -> None:
    async with serve([probe_service(Probe())]) as (_, channel):
        body = b"y" * (6 * 1024 * 1024)
        assert await unary(channel)(body) == body


async def test_drain_finishes_in_flight_calls_and_refuses_new_ones() -> None:
    probe = Probe()
    async with serve([probe_service(probe)]) as (serving, channel):
        in_flight = asyncio.ensure_future(unary(channel)(b"slow"))
        await asyncio.wait_for(probe.entered.wait(), timeout=5)
        drain = asyncio.create_task(serving.drain(grace=10))
        await asyncio.sleep(0)  # let the drain begin before releasing the call
        probe.release.set()
        assert await asyncio.wait_for(in_flight, timeout=10) == b"slow"
        await asyncio.wait_for(drain, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel)(b"late", timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": -1},
        {"port": 70000},
        {"max_message_bytes": 0},
        {"grace_seconds": -1.0},
        {"host": ""},
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ServerSettings(**kwargs)  # type: ignore[arg-type]
