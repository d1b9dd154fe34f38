"""The outbound relay on its own (no registry): routes by the pipeline's config, and refuses
by name what only a gRPC server behind it could do (it has none)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.testing import serve
from mesh.sidecar.outbound import Outbound
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.backends import FakeWorker
from tests.support.gated_discovery import GatedDiscovery

FAULTY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
      route: [{destination: {host: inference}}]
"""


async def test_routes_by_the_pipeline_injects_faults_and_refuses_what_needs_a_server() -> None:
    async with AsyncExitStack() as stack:
        worker, _ = await stack.enter_async_context(serve(FakeWorker("inference-0").services()))
        outbound = Outbound(
            StaticDiscovery([StaticInstance("inference", "i0", worker.address)]),
            reload_interval=0.05,
        )
        address = await outbound.start(0)
        stack.push_async_callback(outbound.drain, 0)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        reply = await infer(pb.ModelInferRequest(model_name="m"), timeout=10)
        assert reply.id == "inference-0"

        # Not a mesh method: no server behind the outbound answers health.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "not a mesh method" in (refused.value.details() or "")

        # An admin apply without a store (in memory), then a route with fault injection:
        # the outbound is the same relay as the gateway, so it injects the fault itself.
        before = outbound.state.config.version
        config = await outbound.pipeline.apply(FAULTY, expected_version=0, dry_run=False)
        assert config.version == before + 1 == outbound.state.config.version
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer(pb.ModelInferRequest(model_name="m"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "fault injected by VirtualService/inference" in (refused.value.details() or "")


POOLED = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 2}}}
"""


async def test_the_outbound_enforces_connection_pool_limits_as_the_gateway_does() -> None:
    """One policy in both modes: maxRequestsPerConnection 2 makes five calls leave the
    worker's sidecar on three connections (as the upstream counts them)."""
    worker = FakeWorker("inference-0")
    async with AsyncExitStack() as stack:
        serving, _ = await stack.enter_async_context(serve(worker.services()))
        outbound = Outbound(
            StaticDiscovery([StaticInstance("inference", "i0", serving.address)]),
            reload_interval=0.05,
        )
        address = await outbound.start(0)
        stack.push_async_callback(outbound.drain, 0)
        await outbound.pipeline.apply(POOLED, expected_version=0, dry_run=False)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        for _ in range(5):
            assert (await infer(pb.ModelInferRequest(model_name="m"), timeout=10)).id == (
                "inference-0"
            )
        assert sorted(worker.peers.count(p) for p in set(worker.peers)) == [1, 2, 2]


async def test_the_outbound_listens_once_discovery_has_answered() -> None:
    """Listener warming, as at the gateway: a worker's first outbound call after its unit
    restarts finds the mesh, not "no healthy endpoint" for a store round trip."""
    async with AsyncExitStack() as stack:
        worker, _ = await stack.enter_async_context(serve(FakeWorker("inference-0").services()))
        discovery = GatedDiscovery([StaticInstance("inference", "i0", worker.address)])
        outbound = Outbound(discovery)
        starting = asyncio.create_task(outbound.start(0))
        await asyncio.wait_for(discovery.asked.wait(), 10)
        await asyncio.sleep(0)
        assert not starting.done()  # asked the store, no answer yet: not listening
        discovery.release.set()
        address = await asyncio.wait_for(starting, 10)
        stack.push_async_callback(outbound.drain, 0)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name="m"), timeout=10
        )
        assert reply.id == "inference-0"
