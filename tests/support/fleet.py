"""Waits on what the gateway's merged RepositoryIndex says about the inference fleet."""

from __future__ import annotations

import time

import grpc

from gateway.fleet_merge import served_everywhere
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc


def served_by_every_worker(
    gateway: str, model: str, version: str | None = None, timeout: float = 60.0
) -> None:
    """Waits until every inference worker serves ``model`` (``version``, else every version
    listed): the gateway's merged index says READY with no worker named as lacking it.
    Workers notice a newly published version at their own poll, so right after training
    one may not have it yet, and a call routed there would be NOT_FOUND."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(gateway) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
            if served_everywhere(index, model, version):
                return
            assert time.monotonic() < deadline, f"{model} not served by every worker: {index}"
            time.sleep(0.2)
