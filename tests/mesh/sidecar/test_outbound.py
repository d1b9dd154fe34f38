"""Outbound: a worker calls another service through its sidecar's localhost port, over mTLS."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import grpc.aio
from elasticsearch import AsyncElasticsearch

from mesh.proxy.inbound import PEER_HEADER
from mesh.security.ca import CertificateAuthority
from mesh.server.testing import serve
from mesh.sidecar.app import SidecarSettings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.schema import Indices
from registry.store import Store
from tests.gateway.backends import FakeWorker
from tests.mesh.sidecar.started import TD, started_sidecar

REPO = Path(__file__).resolve().parents[3]


async def test_worker_reaches_another_service_through_its_sidecar(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    ca = CertificateAuthority.create(TD)
    store = Store(es, indices)
    inference = FakeWorker("inference-0")
    async with AsyncExitStack() as stack:
        inference_serving, _ = await stack.enter_async_context(serve(inference.services()))
        callee = SidecarSettings(
            service="inference",
            app_address=inference_serving.address,
            mtls="STRICT",
            drain_delay=0,
        )
        await started_sidecar(stack, callee, store, ca)
        # The caller's own worker is irrelevant here: only its outbound side is used.
        trainer, _ = await stack.enter_async_context(serve(FakeWorker("trainer").services()))
        settings = SidecarSettings(
            service="training",
            app_address=trainer.address,
            mtls="STRICT",
            drain_delay=0,
            outbound_port=0,
            config_dir=REPO / "config",
        )
        caller = await started_sidecar(stack, settings, store, ca)
        assert caller.outbound is not None and caller.outbound.address is not None
        outbound, address = caller.outbound, caller.outbound.address
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        # Discovered through the registry once the callee's worker is SERVING there.
        while not any(e.healthy for e in outbound.state.snapshot.endpoints("inference")):
            assert loop.time() < deadline, "the outbound side never discovered inference"
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                pb.ModelInferRequest(model_name="m"), timeout=10
            )
    assert reply.id == "inference-0"
    # The callee's sidecar verified the caller's certificate and told its worker who it was.
    assert inference.seen[-1][PEER_HEADER] == "spiffe://cluster.local/ns/meshserve/sa/training"
