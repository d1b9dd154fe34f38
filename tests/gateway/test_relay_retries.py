"""Istio's retry rules through the real relay: attempts alone bound retries (a lone
endpoint is tried again), and ``retries`` without attempts disables them."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos.inference import grpc_service_pb2 as pb
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
