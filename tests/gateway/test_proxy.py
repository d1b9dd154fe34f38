"""The gateway proxy against real gRPC workers on loopback: all call kinds, routing, retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gateway.app import Gateway
from mesh.routing.discovery import DiscoveryUpdate, StaticInstance
from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from protos.inference import grpc_service_pb2 as pb
from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc
from tests.gateway.backends import FakeWorker
from tests.gateway.harness import REPO, infer, mesh


async def test_unary_sticks_by_version_and_forwards_metadata() -> None:
    async with mesh() as m:
        call = m.inference.ModelInfer(
            infer("resnet", "3"), metadata=(("x-tenant", "a"),), timeout=5
        )
        reply = await call
        assert reply.model_name == "resnet" and reply.model_version == "3"
        assert dict(await call.initial_metadata())["x-worker"] == reply.id
        assert dict(await call.trailing_metadata())["x-trailer"] == "done"
        for _ in range(10):
            again = await m.inference.ModelInfer(infer("resnet", "3"), timeout=5)
            assert again.id == reply.id
        owners = {
            (await m.inference.ModelInfer(infer(f"m{i}", "1"), timeout=5)).id for i in range(30)
        }
        assert len(owners) == 3  # versions spread over every worker
        worker = next(w for w in m.workers if w.name == reply.id)
        first = worker.seen[0]
        assert first["x-tenant"] == "a"
        assert len(first["x-request-id"]) == 32  # generated when absent
        deadline = worker.deadlines[0]
        # The client's 5 s deadline travelled (grpc rounds timeouts up a little on the wire),
        # and it won over the route's 60 s timeout and 30 s per-try timeout.
        assert deadline is not None and 0 < deadline < 5.5
        await m.inference.ModelInfer(infer("resnet", "3"))  # no client deadline
        per_try = worker.deadlines[-1]  # without one, config/inference.yaml's perTryTimeout
        assert per_try is not None and 25 < per_try < 30.5


async def test_request_id_is_kept_when_the_client_sends_one() -> None:
    async with mesh(1) as m:
        await m.inference.ModelInfer(infer("x"), metadata=(("x-request-id", "abc"),), timeout=5)
        assert m.workers[0].seen[-1]["x-request-id"] == "abc"


async def test_server_streaming_client_streaming_and_bidi() -> None:
    async with mesh(2) as m:
        data = data_pb2_grpc.DataServiceStub(m.channel)
        batches = [
            b
            async for b in data.StreamBatches(
                data_pb2.StreamBatchesRequest(dataset="d", batch_size=4), timeout=5
            )
        ]
        assert [b.index for b in batches] == [0, 1, 2, 3]

        async def upload() -> AsyncIterator[data_pb2.CreateDatasetRequest]:
            yield data_pb2.CreateDatasetRequest(header=data_pb2.DatasetHeader(name="digits"))
            for _ in range(3):
                yield data_pb2.CreateDatasetRequest(chunk=data_pb2.RecordChunk())

        dataset = await data.CreateDataset(upload(), timeout=5)
        assert dataset.name == "digits" and dataset.num_examples == 4

        async def stream() -> AsyncIterator[pb.ModelInferRequest]:
            for _ in range(3):
                yield infer("bert", "2")

        replies = [r async for r in m.inference.ModelStreamInfer(stream(), timeout=5)]
        assert len(replies) == 3 and len({r.infer_response.id for r in replies}) == 1
        # The bidi stream was routed on its first message: same worker as unary bert/2.
        unary = await m.inference.ModelInfer(infer("bert", "2"), timeout=5)
        assert unary.id == replies[0].infer_response.id


async def test_failed_worker_is_retried_on_the_ring_successor_then_ejected() -> None:
    async with mesh() as m:
        owner_name = (await m.inference.ModelInfer(infer("llama", "1"), timeout=5)).id
        owner = next(w for w in m.workers if w.name == owner_name)
        owner.fail_with = grpc.StatusCode.UNAVAILABLE
        for _ in range(6):
            reply = await m.inference.ModelInfer(infer("llama", "1"), timeout=5)
            assert reply.id != owner_name  # retried on the successor, client never saw the error
        calls_before = len(owner.seen)
        await m.inference.ModelInfer(infer("llama", "1"), timeout=5)
        assert len(owner.seen) == calls_before  # ejected after 5 consecutive failures: skipped
        address = m.addresses[m.workers.index(owner)]
        cluster = m.gateway.state.clusters.cluster("inference")
        assert cluster.outliers is not None and cluster.outliers.is_ejected(address)


async def test_non_retryable_errors_pass_through_unchanged() -> None:
    async with mesh(2) as m:
        for w in m.workers:
            w.fail_with = grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("x", "1"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "failing on purpose" in (caught.value.details() or "")
        assert sum(len(w.seen) for w in m.workers) == 1


async def test_no_healthy_endpoint_and_unknown_method() -> None:
    async with mesh(1) as m:
        m.discovery.push("remove", StaticInstance("inference", "w0-inference", m.addresses[0]))
        await m.wait_endpoints("inference", 0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("x"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "no healthy endpoint for host 'inference' subset ''"
        unknown: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = m.channel.unary_unary(
            "/inference.GRPCInferenceService/NoSuchMethod"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unknown(b"", timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_a_joining_worker_takes_keys_only_for_itself() -> None:
    async with (
        mesh(3) as m,
        serve(FakeWorker("w3").services()) as (serving, _),
    ):
        keys = [(f"m{i}", "1") for i in range(40)]
        before = {k: (await m.inference.ModelInfer(infer(*k), timeout=5)).id for k in keys}
        m.discovery.push("add", StaticInstance("inference", "w3-inference", serving.address))
        await m.wait_endpoints("inference", 4)
        after = {k: (await m.inference.ModelInfer(infer(*k), timeout=5)).id for k in keys}
        moved = [k for k in keys if before[k] != after[k]]
        assert moved and all(after[k] == "w3" for k in moved)


async def test_broken_config_file_is_rejected_and_the_old_one_keeps_routing(tmp_path: Path) -> None:
    for name in ("inference.yaml", "data.yaml", "gateway.yaml"):
        (tmp_path / name).write_text((REPO / "config" / name).read_text())
    async with mesh(2, config_dir=tmp_path) as m:
        version = m.gateway.state.config.version
        (tmp_path / "inference.yaml").write_text(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {hosts: [inference], http: [{route: []}]}\n"
        )
        deadline = asyncio.get_running_loop().time() + 10
        while m.gateway.state.last_rejection is None:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        assert (
            "inference.yaml: VirtualService/x: spec.http[0].route: must have at least one destination"
            in m.gateway.state.last_rejection.error
        )
        assert m.gateway.state.config.version == version
        reply = await m.inference.ModelInfer(infer("resnet", "1"), timeout=5)
        assert reply.model_name == "resnet"


class FlakyDiscovery:
    """Yields one snapshot, then fails; the second subscription yields another."""

    def __init__(self, first: list[StaticInstance], second: list[StaticInstance]) -> None:
        self.rounds = [first, second]
        self.subscriptions = 0

    async def updates(self) -> AsyncIterator[DiscoveryUpdate]:
        self.subscriptions += 1
        yield DiscoveryUpdate("reset", tuple(self.rounds[min(self.subscriptions, 2) - 1]))
        if self.subscriptions == 1:
            raise ConnectionError("store unreachable")
        await asyncio.Event().wait()


async def test_a_failing_discovery_source_keeps_the_last_snapshot_and_resubscribes() -> None:
    async with (
        serve(FakeWorker("w0").services()) as (a, _),
        serve(FakeWorker("w1").services()) as (b, _),
    ):
        first = [StaticInstance("inference", "w0", a.address)]
        second = [*first, StaticInstance("inference", "w1", b.address)]
        source = FlakyDiscovery(first, second)
        gateway = Gateway(source, discovery_retry=0.01)
        serving = await gateway.start(ServerSettings())
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while len(gateway.state.snapshot.endpoints("inference")) != 2:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            assert source.subscriptions == 2
        finally:
            await serving.drain(grace=0)


async def test_server_stream_is_retried_on_another_endpoint_before_its_first_message() -> None:
    async with mesh(2) as m:
        m.workers[0].fail_with = grpc.StatusCode.UNAVAILABLE
        data = data_pb2_grpc.DataServiceStub(m.channel)
        for _ in range(6):  # ROUND_ROBIN sends half of them to the failing worker first
            request = data_pb2.StreamBatchesRequest(dataset="d", batch_size=2)
            batches = [b async for b in data.StreamBatches(request, timeout=5)]
            assert [list(b.example_ids) for b in batches] == [[1], [1]]  # w1 answered
        assert m.workers[0].seen, "the failing worker was tried"
