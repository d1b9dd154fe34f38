"""Istio's retry rules through the real relay: attempts alone bound retries (a lone
endpoint is tried again), and ``retries`` without attempts disables them."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gateway.app import Gateway
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings, Service
from mesh.server.testing import serve
from protos.inference import grpc_service_pb2 as pb
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from tests.gateway.backends import Context
from tests.gateway.test_relay_hardening import edge

CONFIG = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - route: [{destination: {host: inference}}]
      RETRIES
"""


@pytest.mark.parametrize(
    ("retries", "calls"),
    [
        # One endpoint and three retries: Envoy tries it again once no other is left.
        ("retries: {attempts: 3, retryOn: unavailable}", 4),
        # Present without attempts: no retries at all (Istio).
        ("retries: {}", 1),
        # Absent: Istio's default, 2 retries on unavailable among others.
        ("timeout: 10s", 3),
    ],
)
async def test_retries_follow_istio_on_a_lone_endpoint(
    tmp_path: Path, retries: str, calls: int
) -> None:
    async with edge(tmp_path, config=CONFIG.replace("RETRIES", retries), n=1) as mesh:
        worker = mesh.workers[0]
        worker.fail_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.inference.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert len(worker.seen) == calls


TRAINING = "meshserve.training.v1.TrainingService"
TRAINING_CONFIG = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: training}
spec:
  hosts: [training]
  http:
    - route: [{destination: {host: training}}]
      retries: {attempts: 2, retryOn: unavailable}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: training
  ANNOTATIONS
spec:
  host: training
"""


@pytest.mark.parametrize(
    ("annotations", "calls"),
    [
        # Envoy (Istio's default) retries any method its retryOn covers: SubmitJob is not
        # idempotent, and is tried three times.
        ("annotations: {}", 3),
        # meshserve's extension, set in the shipped config: the upstream may have run it.
        ("annotations: {meshserve.io/retry-methods: idempotent}", 1),
    ],
)
async def test_a_status_is_retried_for_any_method_unless_the_destination_says_idempotent(
    tmp_path: Path, annotations: str, calls: int
) -> None:
    seen: list[str] = []

    async def submit(request: training_pb2.SubmitJobRequest, context: Context) -> None:
        seen.append(request.spec.model_name)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "busy")

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    TRAINING,
                    {
                        "SubmitJob": grpc.unary_unary_rpc_method_handler(
                            submit,
                            request_deserializer=training_pb2.SubmitJobRequest.FromString,
                            response_serializer=training_pb2.Job.SerializeToString,
                        )
                    },
                )
            ]
        )

    (tmp_path / "training.yaml").write_text(TRAINING_CONFIG.replace("ANNOTATIONS", annotations))
    async with AsyncExitStack() as stack:
        trainer, _ = await stack.enter_async_context(serve([Service(TRAINING, register)]))
        gateway = Gateway(
            StaticDiscovery([StaticInstance("training", "t0", trainer.address)]),
            config_dir=tmp_path,
        )
        serving = await gateway.start(ServerSettings())
        stack.push_async_callback(serving.drain, 0)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(serving.address))
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        request = training_pb2.SubmitJobRequest(spec=training_pb2.JobSpec(model_name="m"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitJob(request, timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert seen == ["m"] * calls
