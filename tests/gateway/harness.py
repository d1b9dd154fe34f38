"""An in-process mesh for gateway tests: fake workers on loopback behind a real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from gateway.app import Gateway
from gateway.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.backends import FakeWorker

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Mesh:
    gateway: Gateway
    channel: grpc.aio.Channel
    workers: list[FakeWorker]
    addresses: list[str]
    discovery: StaticDiscovery

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


@asynccontextmanager
async def mesh(
    n: int = 3, config_dir: Path | None = REPO / "config", *, data_plane: str = "relay"
) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        workers = [FakeWorker(f"w{i}") for i in range(n)]
        addresses = []
        for worker in workers:
            serving, _ = await stack.enter_async_context(serve(worker.services()))
            addresses.append(serving.address)
        instances = [
            StaticInstance(service, f"{w.name}-{service}", a)
            for w, a in zip(workers, addresses, strict=True)
            for service in ("inference", "data")
        ]
        discovery = StaticDiscovery(instances)
        gateway = Gateway(
            discovery, config_dir=config_dir, reload_interval=0.05, data_plane=data_plane
        )
        serving = await gateway.start(ServerSettings())
        channel = grpc.aio.insecure_channel(serving.address)
        try:
            m = Mesh(gateway, channel, workers, addresses, discovery)
            await m.wait_endpoints("inference", n)
            yield m
        finally:
            await channel.close()
            await serving.drain(grace=0)


def infer(name: str, version: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=name, model_version=version)
