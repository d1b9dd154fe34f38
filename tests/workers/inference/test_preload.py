"""A worker that waits for its sidecar's preload list: what it loads, in what order, and refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest

from mesh.balance.preload import PRELOAD_HEADER, SERVABLE_HEADER, parse_preload, parse_versions
from mesh.server.app import ServerSettings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from workers.inference import testing
from workers.inference.server import RunningWorker, WorkerSettings, run_worker

SIZE = sum(p.numel() * p.element_size() for p in testing.MLP().parameters())


def three_versions(tmp_path: Path) -> str:
    repo = str(tmp_path / "repo")
    config = testing.mlp_config("m")
    config.version_policy.all.SetInParent()
    for seed in (1, 2, 3):
        testing.publish(repo, config, testing.seeded(testing.MLP(), seed))
    return repo


@asynccontextmanager
async def waiting_worker(
    settings: WorkerSettings,
) -> AsyncIterator[tuple[pb_grpc.GRPCInferenceServiceAsyncStub, asyncio.Task[RunningWorker]]]:
    """A worker started in the background on port 0; the stub reaches it before it serves."""
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def body() -> RunningWorker:
        async with run_worker(settings, ServerSettings(), listening.set_result) as running:
            await stop.wait()
            return running

    task = asyncio.create_task(body())
    try:
        address = await asyncio.wait_for(asyncio.shield(listening), 60)
        async with grpc.aio.insecure_channel(address) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel), task
    finally:
        stop.set()
        await task


async def servable(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> str | None:
    """The SERVABLE_HEADER trailer, once the worker lists it (polls with a deadline)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        call = stub.ServerReady(pb.ServerReadyRequest())
        reply = await call
        trailers = dict(await call.trailing_metadata() or ())
        if SERVABLE_HEADER in trailers or reply.ready:
            value = trailers.get(SERVABLE_HEADER)
            return value.decode() if isinstance(value, bytes) else value
        assert asyncio.get_running_loop().time() < deadline, "the worker never listed versions"
        await asyncio.sleep(0.05)


async def loaded(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> dict[str, str]:
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    return {m.version: m.state for m in index.models}


async def until_ready(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while not (await stub.ServerReady(pb.ServerReadyRequest())).ready:
        assert asyncio.get_running_loop().time() < deadline, "the worker never got ready"
        await asyncio.sleep(0.05)


def test_preload_values_parse_or_name_the_bad_entry() -> None:
    assert parse_preload("*") is None
    assert parse_preload("") == frozenset()
    assert parse_preload("a:1, b:22") == frozenset({("a", 1), ("b", 22)})
    assert parse_versions("name:with:colons:3") == {("name:with:colons", 3)}
    for bad in ("a", "a:", ":1", "a:-1", "a:x", "a:1,,b:2"):
        with pytest.raises(ValueError, match="is not name:version"):
            parse_preload(bad)


async def test_the_owned_version_loads_first_and_the_rest_only_while_it_fits(
    tmp_path: Path,
) -> None:
    # Room for two versions of three: the owned one, then the newest other that fits.
    settings = WorkerSettings(
        three_versions(tmp_path),
        device="cpu",
        poll_interval_s=0,
        memory_budget_bytes=2 * SIZE + SIZE // 2,
        preload_wait_s=60,
    )
    async with waiting_worker(settings) as (stub, _):
        assert parse_versions(await servable(stub) or "") == {("m", 1), ("m", 2), ("m", 3)}
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert set((await loaded(stub)).values()) == {"UNAVAILABLE"}  # nothing loaded yet
        await stub.ServerReady(pb.ServerReadyRequest(), metadata=((PRELOAD_HEADER, "m:1"),))
        await until_ready(stub)
        assert await loaded(stub) == {"1": "READY", "2": "UNAVAILABLE", "3": "READY"}
        # Once it serves, a second preload is refused (it would reorder a serving cache).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ServerReady(pb.ServerReadyRequest(), metadata=((PRELOAD_HEADER, "*"),))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await servable(stub) is None  # no longer listed


async def test_a_malformed_preload_is_refused_and_a_good_one_still_taken(tmp_path: Path) -> None:
    settings = WorkerSettings(
        three_versions(tmp_path), device="cpu", poll_interval_s=0, preload_wait_s=60
    )
    async with waiting_worker(settings) as (stub, _):
        await servable(stub)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ServerReady(pb.ServerReadyRequest(), metadata=((PRELOAD_HEADER, "m:one"),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-meshserve-preload" in (refused.value.details() or "")
        # "*": no ring information, so everything servable loads (no budget).
        await stub.ServerReady(pb.ServerReadyRequest(), metadata=((PRELOAD_HEADER, "*"),))
        await until_ready(stub)
        assert await loaded(stub) == {"1": "READY", "2": "READY", "3": "READY"}


async def test_without_a_preload_in_time_everything_loads(tmp_path: Path) -> None:
    settings = WorkerSettings(
        three_versions(tmp_path), device="cpu", poll_interval_s=0, preload_wait_s=0.3
    )
    async with waiting_worker(settings) as (stub, _):
        await until_ready(stub)
        assert await loaded(stub) == {"1": "READY", "2": "READY", "3": "READY"}


def test_a_negative_preload_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="preload wait"):
        WorkerSettings("repo", device="cpu", preload_wait_s=-1)
