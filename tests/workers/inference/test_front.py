"""The worker's serving stacks: the HTTP/2 front (default) in both listen modes, and grpc."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest

from mesh.server.app import ServerSettings
from mesh.server.sidecar_secret import HEADER, new_secret
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from workers.inference.server import WorkerSettings, run_worker


def request() -> pb.ModelInferRequest:
    infer = pb.ModelInferRequest(model_name="mlp", id="r1")
    infer.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    infer.raw_input_contents.append(np.arange(8, dtype=np.float32).tobytes())
    return infer


async def infer_and_stream(
    address: str, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[pb.ModelInferResponse, list[pb.ModelStreamInferResponse]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready = await stub.ServerReady(pb.ServerReadyRequest(), metadata=metadata, timeout=10)
        assert ready.ready

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield request()
            yield request()

        unary = await stub.ModelInfer(request(), metadata=metadata, timeout=10)
        streamed = [
            r async for r in stub.ModelStreamInfer(requests(), metadata=metadata, timeout=10)
        ]
        return unary, streamed


@pytest.mark.parametrize("serve_with", ["h2", "grpc"])
async def test_both_stacks_answer_alike_on_a_unix_socket(
    model_repo: Path, tmp_path: Path, serve_with: str
) -> None:
    settings = WorkerSettings(
        str(model_repo), device="cpu", poll_interval_s=0, serve_with=serve_with
    )
    address = f"unix:{tmp_path / 'worker.sock'}"
    async with run_worker(settings, ServerSettings(host=address)) as running:
        assert running.serving.address == address
        unary, streamed = await infer_and_stream(address)
    assert (unary.model_name, unary.model_version, unary.id) == ("mlp", "1", "r1")
    assert len(unary.raw_output_contents[0]) == 2 * 3 * 4
    assert [s.infer_response.raw_output_contents for s in streamed] == [
        unary.raw_output_contents
    ] * 2
    assert all(not s.error_message for s in streamed)


async def test_the_front_serves_the_sidecar_only_on_a_tcp_port(model_repo: Path) -> None:
    secret = new_secret()
    settings = WorkerSettings(str(model_repo), device="cpu", poll_interval_s=0)
    async with run_worker(settings, ServerSettings(sidecar_secret=secret)) as running:
        address = running.serving.address
        for wrong in ((), ((HEADER, "y" * len(secret)),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer_and_stream(address, wrong)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as hot:
                    await stub.ModelInfer(request(), metadata=wrong, timeout=10)
                assert hot.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert "through the sidecar" in (hot.value.details() or "")
        unary, streamed = await infer_and_stream(address, ((HEADER, secret),))
        assert unary.model_name == "mlp" and len(streamed) == 2


def test_an_unknown_stack_is_refused(model_repo: Path) -> None:
    with pytest.raises(ValueError, match="serve_with must be one of h2, grpc"):
        WorkerSettings(str(model_repo), serve_with="http1")
