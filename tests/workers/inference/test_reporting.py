"""Which ModelInfer responses carry the load report: the pure decision, and on a real worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import torch

from mesh.balance.report import LoadReport
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.workers.inference.test_service import infer_request
from workers.inference.reporting import ReportSampler
from workers.inference.server import WorkerSettings, run_worker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_response_then_each_change_of_the_loaded_set_carries_it() -> None:
    clock = Clock()
    sampler = ReportSampler(interval_s=1.0, clock=clock)
    assert sampler.due(("mlp", 1))
    assert not sampler.due(("mlp", 1))
    assert sampler.due(("cnn", 1))  # loaded set changed: at once, whatever the interval
    assert sampler.due(("mlp", 1))
    assert not sampler.due(("mlp", 1))


def test_unchanged_set_carries_it_once_per_interval() -> None:
    clock = Clock()
    sampler = ReportSampler(interval_s=0.05, clock=clock)
    assert sampler.due("s")
    carried = 0
    for _ in range(1000):  # 1000 responses over one second
        clock.now += 0.001
        carried += sampler.due("s")
    assert 19 <= carried <= 20


def test_interval_zero_carries_it_on_every_response() -> None:
    sampler = ReportSampler(interval_s=0, clock=Clock())
    assert all(sampler.due("s") for _ in range(5))


def test_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        ReportSampler(interval_s=-1)


async def test_model_infer_carries_it_when_due_and_server_ready_always(model_repo: Path) -> None:
    settings = WorkerSettings(str(model_repo), device="cpu", poll_interval_s=0)
    async with run_worker(settings) as running:
        # An interval no test run reaches: only the loaded set's changes make it due.
        running.servicer.sampler = ReportSampler(interval_s=3600)
        async with grpc.aio.insecure_channel(running.serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def trailers(call: Any) -> dict[str, str]:
                await call
                return {k: str(v) for k, v in await call.trailing_metadata() or ()}

            def infer() -> Any:
                return stub.ModelInfer(infer_request("mlp", {"x": torch.zeros(1, 4)}))

            first = await trailers(infer())
            assert "mlp:1" in LoadReport.from_metadata(first.items()).loaded_versions
            assert not any(k.startswith("x-meshserve-") for k in await trailers(infer()))
            ready = await trailers(stub.ServerReady(pb.ServerReadyRequest()))
            assert "mlp:1" in LoadReport.from_metadata(ready.items()).loaded_versions
