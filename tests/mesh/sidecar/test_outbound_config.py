"""A sidecar's outbound follows the registry's config store: `meshserve apply` reaches it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack

import grpc.aio
from elasticsearch import AsyncElasticsearch

from gateway.app import Gateway
from mesh.routing.pipeline import validate_documents
from mesh.security.ca import CertificateAuthority
from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from mesh.sidecar.app import SidecarSettings
from mesh.sidecar.outbound import Outbound
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from registry.discovery import RegistryDiscovery
from registry.schema import Indices
from registry.store import Store
from tests.gateway.backends import FakeWorker
from tests.gateway.harness import ADMIN_METADATA, REPO, admin_guard
from tests.mesh.sidecar.started import TD, started_sidecar
from tests.support.istio_yaml import BAD_SUBSET

#: A header-matched route to a subset: canary callers reach v2, everyone else v1.
BY_HEADER = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: inference
spec:
  hosts: [inference]
  http:
    - name: canary
      match:
        - headers:
            x-canary: {exact: "yes"}
      route:
        - destination: {host: inference, subset: v2}
    - name: stable
      route:
        - destination: {host: inference, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: inference
spec:
  host: inference
  subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2}
"""
#: Parses, but routes to a subset no DestinationRule defines: the merge refuses it.


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


async def start_mesh(stack: AsyncExitStack, store: Store) -> Outbound:
    """Two inference sidecars (labels version=v1, v2) and a caller with an outbound."""
    ca = CertificateAuthority.create(TD)
    for version in ("v1", "v2"):
        worker, _ = await stack.enter_async_context(serve(FakeWorker(version).services()))
        callee = SidecarSettings(
            service="inference",
            app_address=worker.address,
            mtls="STRICT",
            drain_delay=0,
            labels=(("version", version),),
        )
        await started_sidecar(stack, callee, store, ca)
    trainer, _ = await stack.enter_async_context(serve(FakeWorker("trainer").services()))
    settings = SidecarSettings(
        service="training",
        app_address=trainer.address,
        mtls="STRICT",
        drain_delay=0,
        outbound_port=0,
        reload_interval=0.05,
    )
    caller = await started_sidecar(stack, settings, store, ca)
    assert caller.outbound is not None
    outbound = caller.outbound
    await until(
        lambda: sum(e.healthy for e in outbound.state.snapshot.endpoints("inference")) == 2,
        "the outbound never discovered both inference instances",
    )
    return outbound


async def infer(address: str, *, canary: bool) -> str:
    metadata = (("x-canary", "yes"),) if canary else ()
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name="m"), metadata=metadata, timeout=10
        )
    return reply.id


async def test_the_outbound_follows_a_virtual_service_applied_through_a_gateway(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    store = Store(es, indices)
    async with AsyncExitStack() as stack:
        outbound = await start_mesh(stack, store)
        assert outbound.address is not None
        gateway = Gateway(
            RegistryDiscovery(store.watcher()),
            config_dir=REPO / "config",
            config_store=store.config(validator=validate_documents),
            guard=admin_guard(),
        )
        serving = await gateway.start(ServerSettings(port=0))
        stack.push_async_callback(serving.drain, 0)
        async with grpc.aio.insecure_channel(serving.address) as channel:
            applied = await admin_pb2_grpc.AdminStub(channel).ApplyConfig(
                admin_pb2.ApplyConfigRequest(yaml=BY_HEADER),
                metadata=ADMIN_METADATA,
                timeout=10,
            )
        assert applied.version == gateway.state.config.version
        stored = gateway.store_version
        assert stored >= 1
        await until(
            lambda: outbound.pipeline.store_version == stored,
            "the outbound never took the applied store version",
        )
        assert outbound.state.last_rejection is None
        for _ in range(4):
            assert await infer(outbound.address, canary=True) == "v2"
            assert await infer(outbound.address, canary=False) == "v1"


async def test_the_outbound_refuses_a_bad_store_version_and_keeps_routing(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    store = Store(es, indices)
    # Written as another writer might (the store's own check only parses).
    routing = store.config(validator=validate_documents)
    async with AsyncExitStack() as stack:
        outbound = await start_mesh(stack, store)
        assert outbound.address is not None
        good = await routing.apply(BY_HEADER, expected_version=0, applied_by="test")
        await until(
            lambda: outbound.pipeline.store_version == good.version,
            "the outbound never took the good store version",
        )
        running = outbound.state.config.version
        bad = await routing.apply(BAD_SUBSET, expected_version=good.version, applied_by="test")
        await until(
            lambda: outbound.state.last_rejection is not None, "the bad version was not refused"
        )
        rejection = outbound.state.last_rejection
        assert rejection is not None
        assert rejection.source == f"store 'routing' v{bad.version}"
        assert "nowhere" in rejection.error
        # Last known good: the running config and its routes stay.
        assert outbound.state.config.version == running
        assert outbound.pipeline.store_version == good.version
        assert await infer(outbound.address, canary=True) == "v2"
        assert await infer(outbound.address, canary=False) == "v1"
