"""A header list the gateway accepts reaches the worker: one limit along the whole path."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
import grpc.aio
import pytest

from gateway.app import Gateway
from mesh.header_limits import HOP_ALLOWANCE, MAX_HEADER_LIST
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings, Service
from mesh.server.testing import serve
from tests.gateway.test_relay import SERVICE, UNARY, relayed


@pytest.mark.parametrize("size", [20 * 1024, MAX_HEADER_LIST - 2048])
async def test_a_header_the_gateway_accepts_is_accepted_by_the_worker(size: int) -> None:
    """grpc-core's servers answered RESOURCE_EXHAUSTED above 8 KiB (some calls) and 16 KiB
    (all) while the relay accepts 64 KiB: a 20 KiB header passed the gateway and failed at
    the worker."""
    async with relayed() as s:
        # grpc-core applies its limits once its SETTINGS are acknowledged: the first call
        # on a connection would pass whatever they are.
        assert await s.unary(b"warm", timeout=10) == b"mraw"
        for _ in range(5):  # the soft limit refused a random share of calls
            got = await s.unary(b"abc", metadata=(("x-big", "v" * size),), timeout=10)
            assert got == b"cba"


def listed(metadata: Iterable[tuple[str, str | bytes]]) -> int:
    """A header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it."""
    return sum(len(k) + len(v) + 32 for k, v in metadata)


async def test_what_the_gateway_adds_to_a_forwarded_call_fits_a_hops_allowance() -> None:
    """Each hop behind the edge accepts HOP_ALLOWANCE more than the one before it: that
    holds only while a hop adds less than that."""
    seen: list[int] = []

    async def record(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.append(listed((k, v) for k, v in context.invocation_metadata() or ()))
        return request

    def register(server: grpc.aio.Server) -> None:
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(record)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler})]
        )

    async with serve([Service(SERVICE, register)]) as (worker, direct):
        gateway = Gateway(
            StaticDiscovery([StaticInstance("inference", "w0", worker.address)]), config_dir=None
        )
        serving = await gateway.start(ServerSettings())
        try:
            while not gateway.state.snapshot.endpoints("inference"):
                await asyncio.wait_for(gateway.endpoints_changed.wait(), timeout=10)
            metadata = (
                ("x-big", "v" * 1000),
                ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
            )
            async with grpc.aio.insecure_channel(serving.address) as channel:
                via: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
                await via(b"", metadata=metadata, timeout=10)
            straight: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = direct.unary_unary(UNARY)
            await straight(b"", metadata=metadata, timeout=10)
        finally:
            await serving.drain(grace=0)
    relayed_size, direct_size = seen
    assert 0 < relayed_size - direct_size < HOP_ALLOWANCE // 4, seen
