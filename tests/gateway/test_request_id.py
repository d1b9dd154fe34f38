"""The gateway returns each call's x-request-id in the response headers, whoever answers it:
a worker (every call kind), the gateway's own gRPC server, or the relay itself."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.routing.discovery import StaticInstance
from protos.inference import grpc_service_pb2 as pb
from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc
from tests.gateway.harness import infer, mesh

ID = "x-request-id"
GENERATED = re.compile(r"[0-9a-f]{32}")


def header(metadata: grpc.aio.Metadata | None, name: str = ID) -> str | None:
    found = [v for k, v in (metadata or ()) if k == name]
    assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
    return str(found[0]) if found else None


async def error_id(call: grpc.aio.Call) -> str | None:
    """The id of a failed call. A trailers-only response has one header block, which
    grpc's clients report as trailing metadata; it must not appear twice."""
    initial, trailing = (
        header(await call.initial_metadata()),
        header(await call.trailing_metadata()),
    )
    assert initial is None or trailing is None
    return initial or trailing


async def test_each_call_kind_returns_the_id_the_worker_saw() -> None:
    async with mesh(1) as m:
        worker = m.workers[0]
        unary = m.inference.ModelInfer(infer("resnet", "1"), timeout=5)
        await unary
        generated = header(await unary.initial_metadata())
        assert generated is not None and GENERATED.fullmatch(generated)
        assert worker.seen[-1][ID] == generated

        mine = m.inference.ModelInfer(infer("resnet", "1"), metadata=((ID, "abc"),), timeout=5)
        await mine
        assert header(await mine.initial_metadata()) == "abc"
        assert worker.seen[-1][ID] == "abc"

        data = data_pb2_grpc.DataServiceStub(m.channel)
        batches = data.StreamBatches(
            data_pb2.StreamBatchesRequest(dataset="d", batch_size=2), timeout=5
        )
        assert [b.index async for b in batches] == [0, 1]
        assert header(await batches.initial_metadata()) == worker.seen[-1][ID]

        async def upload() -> AsyncIterator[data_pb2.CreateDatasetRequest]:
            yield data_pb2.CreateDatasetRequest(header=data_pb2.DatasetHeader(name="digits"))

        created = data.CreateDataset(upload(), metadata=((ID, "up-1"),), timeout=5)
        assert (await created).name == "digits"
        assert header(await created.initial_metadata()) == "up-1"

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield infer("bert", "2")

        stream = m.inference.ModelStreamInfer(requests(), metadata=((ID, "bidi"),), timeout=5)
        assert len([r async for r in stream]) == 1
        assert header(await stream.initial_metadata()) == "bidi"
        # Nothing else of the response changed: the worker's own metadata is all there.
        assert header(await unary.initial_metadata(), "x-worker") == "w0"
        assert header(await unary.trailing_metadata(), "x-trailer") == "done"
        assert header(await unary.trailing_metadata()) is None


async def test_trailers_only_errors_carry_the_id_whoever_answers() -> None:
    async with mesh(1) as m:
        # A worker's error (a trailers-only response, passed through).
        m.workers[0].fail_with = grpc.StatusCode.INVALID_ARGUMENT
        failing = m.inference.ModelInfer(infer("x", "1"), metadata=((ID, "w-err"),), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await failing
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert await error_id(failing) == "w-err"
        assert m.workers[0].seen[-1][ID] == "w-err"

        # The gateway's own gRPC server: a method no mesh service has, and a working call.
        unknown: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = m.channel.unary_unary(
            "/nope.Service/Method"
        )
        missing = unknown(b"", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await missing
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        generated = await error_id(missing)
        assert generated is not None and GENERATED.fullmatch(generated)
        health = health_pb2_grpc.HealthStub(m.channel).Check(
            health_pb2.HealthCheckRequest(), metadata=((ID, "hc"),), timeout=5
        )
        assert (await health).status == health_pb2.HealthCheckResponse.SERVING
        assert header(await health.initial_metadata()) == "hc"

        # The relay's own answer: no endpoint to route to.
        m.discovery.push("remove", StaticInstance("inference", "w0-inference", m.addresses[0]))
        await m.wait_endpoints("inference", 0)
        unrouted = m.inference.ModelInfer(infer("x"), metadata=((ID, "no-route"),), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unrouted
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert await error_id(unrouted) == "no-route"
        anonymous = m.inference.ModelInfer(infer("x"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await anonymous
        generated = await error_id(anonymous)
        assert generated is not None and GENERATED.fullmatch(generated)
