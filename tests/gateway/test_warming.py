"""A starting gateway listens only once its first discovery snapshot is in (Envoy's
listener warming), so a gateway restarted under load never answers "no healthy endpoint"
for the store's first round trip; and a store that stays silent does not keep it shut."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import grpc.aio

from gateway.app import Gateway
from mesh.routing.discovery import StaticInstance
from mesh.server.app import ServerSettings
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.harness import REPO, infer, serve_workers
from tests.support.gated_discovery import GatedDiscovery


async def test_the_first_call_after_start_is_routed() -> None:
    async with AsyncExitStack() as stack:
        workers, addresses = await serve_workers(stack, 1)
        discovery = GatedDiscovery([StaticInstance("inference", "w0-inference", addresses[0])])
        gateway = Gateway(discovery, config_dir=REPO / "config")
        starting = asyncio.create_task(gateway.start(ServerSettings()))
        await asyncio.wait_for(discovery.asked.wait(), 10)
        # The store has been asked and has not answered: the gateway is not listening yet.
        await asyncio.sleep(0)
        assert not starting.done()
        discovery.release.set()
        serving = await asyncio.wait_for(starting, 10)
        try:
            async with grpc.aio.insecure_channel(serving.address) as channel:
                reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    infer("demo"), timeout=10
                )
            assert reply.model_name == "demo"
            assert len(workers[0].requests) == 1
        finally:
            await serving.drain(grace=0)


async def test_a_silent_store_delays_listening_only_up_to_the_initial_fetch_timeout() -> None:
    discovery = GatedDiscovery([])
    gateway = Gateway(discovery, config_dir=REPO / "config", initial_fetch_timeout=0.2)
    serving = await asyncio.wait_for(gateway.start(ServerSettings()), 10)
    try:
        assert not discovery.release.is_set()
        async with grpc.aio.insecure_channel(serving.address) as channel:
            try:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    infer("demo"), timeout=10
                )
            except grpc.aio.AioRpcError as refused:
                # Listening, and saying why nothing routes yet.
                assert refused.code() is grpc.StatusCode.UNAVAILABLE
                assert "no healthy endpoint" in (refused.details() or "")
            else:
                raise AssertionError("routed with no endpoint discovered")
    finally:
        await serving.drain(grace=0)
