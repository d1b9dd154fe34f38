"""In process: a joining worker preloads the version the ring gives it, then serves.

Two real inference workers, each behind a real sidecar registered in the store (embedded
noida-db); the second joins with a memory budget that fits one of the model's two versions.
Its sidecar works out, from the routing YAML and the registry, which version the gateway's
ring will send it; the worker loads that one before it reports SERVING, and requests
routed by the gateway's own ClusterMap meet warm weights everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
import torch
from elasticsearch import AsyncElasticsearch

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import Endpoint, EndpointsSnapshot, endpoint_from_instance
from mesh.balance.load import LoadTracker
from mesh.balance.preload import PRELOAD_HEADER
from mesh.config.snapshot import config_from_path
from mesh.routing.ownership import owned_versions
from mesh.server.app import ServerSettings
from mesh.server.private import PrivateSocket
from mesh.sidecar.app import Sidecar, SidecarSettings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.directory import read_live
from registry.discovery import RegisteredInstance
from registry.embedded import free_port
from registry.instances import Status
from registry.schema import Indices
from registry.store import Store
from workers.inference import testing
from workers.inference.repository import COLD_LOAD
from workers.inference.server import RunningWorker, WorkerSettings, run_worker

RULE = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: inference
  annotations:
    meshserve.io/hash-fields: "model_name,model_version"
    meshserve.io/ring-points: per-endpoint
spec:
  host: inference
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-model-version
        ringHash: {minimumRingSize: 256}
"""


def split_name(first: str, joiner: str, config_dir: Path) -> str:
    """A model name whose versions 1 and 2 the two-worker ring splits: one to each."""
    config = config_from_path(config_dir)
    a, b = Endpoint(first), Endpoint(joiner)
    for i in range(200):
        name = f"m{i}"
        found = owned_versions(config, "inference", [a], b, {name: [1, 2]})
        assert found is not None
        if len(found.owned) == 1:
            return name
    raise AssertionError("no model name splits its versions over the two workers")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_a_joining_worker_preloads_the_version_the_ring_gives_it(
    es: AsyncElasticsearch, indices: Indices, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "inference.yaml").write_text(RULE)
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    addresses = [f"localhost:{p}" for p in ports]
    name = split_name(addresses[0], addresses[1], config_dir)
    repo = str(tmp_path / "repo")
    config = testing.mlp_config(name)
    config.version_policy.all.SetInParent()  # both versions served (Triton's default: latest 1)
    for seed in (1, 2):
        testing.publish(repo, config, testing.seeded(testing.MLP(), seed))
    size = sum(p.numel() * p.element_size() for p in testing.MLP().parameters())
    store = Store(es, indices)

    async def unit(
        stack: AsyncExitStack, port: int, settings: WorkerSettings
    ) -> tuple[RunningWorker, Sidecar]:
        # The worker on a private socket (as `meshserve run` starts it), started in the
        # background: a joiner waits for its sidecar before run_worker yields.
        private = PrivateSocket.create("preload-test-")
        stack.callback(private.remove)
        started = await stack.enter_async_context(
            in_background(settings, ServerSettings(host=private.address))
        )
        sidecar = Sidecar(
            SidecarSettings(
                service="inference",
                app_address=private.address,
                port=port,
                mtls="DISABLE",
                config_dir=config_dir,
                drain_delay=0.0,
                heartbeat_interval=0.2,
            ),
            store,
        )
        await sidecar.start()
        stack.push_async_callback(sidecar.drain)
        return await asyncio.wait_for(started, 120), sidecar

    async def serving() -> set[str]:
        live = await read_live(es, indices, datetime.now(UTC))
        return {i.address for i in live.instances.values() if i.status == Status.SERVING}

    async with AsyncExitStack() as stack:
        # The first worker: no budget, every version loaded (a plain start).
        first, first_sidecar = await unit(
            stack, ports[0], WorkerSettings(repo, device="cpu", poll_interval_s=0)
        )
        await until(lambda: _has(serving(), {addresses[0]}), "the first worker to serve")
        assert first_sidecar.preloaded is False  # it never asked
        # The second joins with room for one version of two, and waits for its sidecar.
        joiner, joiner_sidecar = await unit(
            stack,
            ports[1],
            WorkerSettings(
                repo,
                device="cpu",
                poll_interval_s=0,
                memory_budget_bytes=size + size // 2,
                preload_wait_s=60,
            ),
        )
        await until(lambda: _has(serving(), set(addresses)), "the joiner to serve")
        live = (await read_live(es, indices, datetime.now(UTC))).instances.values()
        endpoints = [endpoint_from_instance(RegisteredInstance.of(i)) for i in live]
        owned = owned_versions(
            config_from_path(config_dir),
            "inference",
            [e for e in endpoints if e.address != addresses[1]],
            next(e for e in endpoints if e.address == addresses[1]),
            {name: [1, 2]},
        )
        assert owned is not None and len(owned.owned) == 1
        assert joiner_sidecar.preloaded == owned.owned
        # Loaded before SERVING: exactly the owned version, the other not at all.
        assert joiner.repository.cache.loaded_keys() == sorted(owned.owned)
        (version,) = (v for _, v in owned.owned)
        async with grpc.aio.insecure_channel(addresses[1]) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
            states = {m.version: (m.state, m.reason) for m in index.models}
            assert states[str(version)] == ("READY", "")
            assert states[str(3 - version)] == ("UNAVAILABLE", "not loaded yet")
            stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))
            assert {s.version for s in stats.model_stats if s.memory_usage} == {str(version)}
            # A caller's preload header never reaches the worker through the relay: the
            # worker, no longer waiting, would refuse it with FAILED_PRECONDITION.
            reply = await stub.ServerReady(
                pb.ServerReadyRequest(), metadata=((PRELOAD_HEADER, f"{name}:1"),)
            )
            assert reply.ready
        # Requests for both versions and for the latest, routed as the gateway routes them.
        clusters = ClusterMap(
            config_from_path(config_dir),
            EndpointsSnapshot({"inference": endpoints}),
            LoadTracker(),
            time.monotonic,
        )
        sent_to = set()
        for key, requested in ((f"{name}/1", "1"), (f"{name}/2", "2"), (f"{name}/latest", "")):
            target = clusters.cluster("inference").pick(key, random.Random(0)).candidates[0]
            sent_to.add(target.address)
            async with grpc.aio.insecure_channel(target.address) as channel:
                request = pb.ModelInferRequest(model_name=name, model_version=requested)
                request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
                request.raw_input_contents.append(torch.zeros(1, 4).numpy().tobytes())
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert addresses[1] in sent_to  # the joiner took its share
        assert first.repository.cold_loads == joiner.repository.cold_loads == 0
        assert not [r for r in caplog.records if COLD_LOAD in r.getMessage()]


@asynccontextmanager
async def in_background(
    settings: WorkerSettings, server: ServerSettings
) -> AsyncIterator[asyncio.Future[RunningWorker]]:
    """Runs ``run_worker`` in a task; the future resolves once it has started."""
    started: asyncio.Future[RunningWorker] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def body() -> None:
        try:
            async with run_worker(settings, server) as running:
                started.set_result(running)
                await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    task = asyncio.create_task(body())
    try:
        yield started
    finally:
        stop.set()
        await task


async def _has(found: Awaitable[set[str]], wanted: set[str]) -> bool:
    return wanted <= await found
