"""An in-process mesh for gateway tests: fake workers on loopback behind a real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from gateway.app import Gateway
from gateway.auth import ADMIN_SCOPE, AuthConfig, ClientGuard, hash_key
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.backends import FakeWorker

REPO = Path(__file__).resolve().parents[2]
#: The admin credential of every harness gateway (as `meshserve up` makes one).
ADMIN_KEY = "msk_test-admin-key-for-the-gateway-harness"
ADMIN_METADATA = (("x-api-key", ADMIN_KEY),)


def admin_guard(*, data_plane_keys: dict[str, str] | None = None) -> ClientGuard:
    """What `up` configures: one admin key, the data plane open (or keyed: client → key)."""
    keys = {hash_key(ADMIN_KEY): "admin"}
    keys.update({hash_key(k): c for c, k in (data_plane_keys or {}).items()})
    return ClientGuard(
        AuthConfig(
            api_keys=keys,
            key_scopes={hash_key(ADMIN_KEY): frozenset({ADMIN_SCOPE})},
            open_data_plane=True,
        )
    )


class WithMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (a credential) to every unary call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        old = client_call_details
        details = grpc.aio.ClientCallDetails(
            old.method,
            old.timeout,
            grpc.aio.Metadata(*(old.metadata or ()), *self.metadata),
            old.credentials,
            old.wait_for_ready,
        )
        return await continuation(details, request)


def admin_channel(address: str) -> grpc.aio.Channel:
    """A channel whose calls carry the harness's admin key."""
    return grpc.aio.insecure_channel(address, interceptors=[WithMetadata(ADMIN_METADATA)])


@dataclass
class Mesh:
    gateway: Gateway
    channel: grpc.aio.Channel
    workers: list[FakeWorker]
    addresses: list[str]
    discovery: StaticDiscovery
    #: Calls carry the admin key (the Admin API needs it).
    admin_channel: grpc.aio.Channel

    @property
    def inference(self) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def wait_endpoints(self, host: str, count: int) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while len(self.gateway.state.snapshot.endpoints(host)) != count:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{host} never had {count} endpoints"
            )
            await asyncio.wait_for(self.gateway.endpoints_changed.wait(), timeout=10)


async def serve_workers(stack: AsyncExitStack, n: int) -> tuple[list[FakeWorker], list[str]]:
    """``n`` fake workers named w0, w1, …, each served on a free port until ``stack``
    closes, and their addresses in the same order."""
    workers = [FakeWorker(f"w{i}") for i in range(n)]
    addresses = []
    for worker in workers:
        serving, _ = await stack.enter_async_context(serve(worker.services()))
        addresses.append(serving.address)
    return workers, addresses


@asynccontextmanager
async def mesh(n: int = 3, config_dir: Path | None = REPO / "config") -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        workers, addresses = await serve_workers(stack, n)
        instances = [
            StaticInstance(service, f"{w.name}-{service}", a)
            for w, a in zip(workers, addresses, strict=True)
            for service in ("inference", "data")
        ]
        discovery = StaticDiscovery(instances)
        gateway = Gateway(
            discovery,
            config_dir=config_dir,
            reload_interval=0.05,
            guard=admin_guard(),
        )
        serving = await gateway.start(ServerSettings())
        channel = grpc.aio.insecure_channel(serving.address)
        privileged = admin_channel(serving.address)
        try:
            m = Mesh(gateway, channel, workers, addresses, discovery, privileged)
            await m.wait_endpoints("inference", n)
            yield m
        finally:
            await privileged.close()
            await channel.close()
            await serving.drain(grace=0)


def infer(name: str, version: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=name, model_version=version)
