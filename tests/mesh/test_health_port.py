"""A worker's health port (``--health-port``): gRPC health alone, in plaintext, for the
kubelet's livenessProbe, alive whatever the worker's readiness; gone once it drains."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.server.app import ServerSettings, start_server
from mesh.server.health_port import LIVENESS_SERVICE
from mesh.server.listen import add_listen_arguments, server_settings
from mesh.server.sidecar_secret import write_secret
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_the_health_port_answers_liveness_while_not_ready_and_nothing_else(
    tmp_path: Path,
) -> None:
    secret = write_secret(tmp_path / "secret")
    # A worker behind its sidecar's secret, still loading (NOT_SERVING).
    serving = await start_server(
        ServerSettings(sidecar_secret=secret, health_port=0), [], serving=False
    )
    try:
        assert serving.health_address is not None
        port = serving.health_address.rsplit(":", 1)[1]
        # Dialled as the kubelet dials: plaintext, no secret, not through localhost only.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            health = health_pb2_grpc.HealthStub(plain)
            live = await health.Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5
            )
            assert live.status == SERVING
            ready = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ready.status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.GRPCInferenceServiceStub(plain).ServerLive(
                    pb.ServerLiveRequest(), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Ready or not, alive: readiness never moves the liveness service.
        await serving.set_serving(True)
        await serving.set_serving(False)
        async with grpc.aio.insecure_channel(serving.health_address) as plain:
            live = await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5
            )
            assert live.status == SERVING
    finally:
        await serving.drain(grace=0)
    async with grpc.aio.insecure_channel(serving.health_address) as gone:
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await health_pb2_grpc.HealthStub(gone).Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=2
            )
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_flag_reaches_the_settings() -> None:
    parser = argparse.ArgumentParser()
    add_listen_arguments(parser, default_port=9000)
    assert server_settings(parser.parse_args([])).health_port is None
    settings = server_settings(parser.parse_args(["--health-port", "15020"]))
    assert settings.health_port == 15020
    with pytest.raises(SystemExit):
        parser.parse_args(["--health-port", "70000"])
    with pytest.raises(ValueError, match="health_port"):
        ServerSettings(health_port=-1)
