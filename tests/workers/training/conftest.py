"""Fixtures: a real data service with small built-in datasets, and a training worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc.aio
import pytest

from mesh.server.app import ServerSettings, Serving
from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from tests.registry.conftest import es, indices, store_url  # noqa: F401  (store fixtures)
from workers.data.server import DataWorkerConfig
from workers.data.server import start as start_data
from workers.training.manager import JobManager, WorkerSettings
from workers.training.server import training_worker

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class DataServer:
    serving: Serving
    stub: data_pb2_grpc.DataServiceAsyncStub
    root: Path

    @property
    def address(self) -> str:
        return self.serving.address


@pytest.fixture
async def data_server(tmp_path: Path) -> AsyncIterator[DataServer]:
    root = tmp_path / "data"
    serving = await start_data(DataWorkerConfig(server=ServerSettings(), root=str(root)))
    channel = grpc.aio.insecure_channel(serving.address)
    server = DataServer(serving, data_pb2_grpc.DataServiceStub(channel), root)
    try:
        await server.stub.CreateBuiltinDataset(
            data_pb2.CreateBuiltinDatasetRequest(
                name="blobs",
                seed=7,
                blobs=data_pb2.BlobsSource(
                    num_examples=800, num_classes=3, num_features=4, cluster_std=1.5
                ),
            )
        )
        await server.stub.CreateBuiltinDataset(
            data_pb2.CreateBuiltinDatasetRequest(
                name="line",
                seed=7,
                regression=data_pb2.RegressionSource(num_examples=400, num_features=4, noise=0.1),
            )
        )
        yield server
    finally:
        await channel.close()
        # A test may have replaced the serving (a data service restart).
        await server.serving.drain(grace=0)


@dataclass
class Worker:
    stub: training_pb2_grpc.TrainingServiceAsyncStub
    settings: WorkerSettings
    model_repo: Path
    manager: JobManager


@pytest.fixture
async def worker(tmp_path: Path, data_server: DataServer) -> AsyncIterator[Worker]:
    settings = WorkerSettings(
        artifacts_url=str(tmp_path / "artifacts"),
        model_repo_url=str(tmp_path / "models"),
        data_address=data_server.address,
        max_concurrent_jobs=2,
    )
    async with training_worker(settings, ServerSettings()) as running:
        channel = grpc.aio.insecure_channel(running.serving.address)
        try:
            yield Worker(
                training_pb2_grpc.TrainingServiceStub(channel),
                settings,
                tmp_path / "models",
                running.manager,
            )
        finally:
            await channel.close()


def mlp_spec(**overrides: object) -> training_pb2.JobSpec:
    """A small, fast MLP job on the blobs dataset."""
    spec = training_pb2.JobSpec(
        model_name="blobs-mlp",
        architecture=training_pb2.Architecture(mlp=training_pb2.MlpSpec(hidden_sizes=[32])),
        dataset=training_pb2.DatasetRef(name="blobs"),
        optimizer=training_pb2.Optimizer(kind=training_pb2.OPTIMIZER_KIND_ADAM, learning_rate=0.02),
        epochs=4,
        batch_size=32,
        seed=3,
        standardize=True,
        log_every_steps=5,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


async def eventually(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    timeout: float = 90.0,
    interval: float = 0.05,
) -> T:
    """Polls ``probe`` until ``done`` holds for its result, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value}")
        await asyncio.sleep(interval)


TERMINAL = (
    training_pb2.JOB_STATE_SUCCEEDED,
    training_pb2.JOB_STATE_FAILED,
    training_pb2.JOB_STATE_CANCELLED,
)


async def finished(
    stub: training_pb2_grpc.TrainingServiceAsyncStub, job_id: str
) -> training_pb2.Job:
    async def get() -> training_pb2.Job:
        job: training_pb2.Job = await stub.GetJob(training_pb2.GetJobRequest(job_id=job_id))
        return job

    return await eventually(get, lambda job: job.state in TERMINAL)


async def wait_for_event(
    stub: training_pb2_grpc.TrainingServiceAsyncStub,
    job_id: str,
    matches: Callable[[training_pb2.JobEvent], bool],
    from_event: int = 0,
) -> training_pb2.JobEvent:
    """Watches a job until an event matches; the watch call is cancelled, not left to GC."""
    call = stub.WatchJob(training_pb2.WatchJobRequest(job_id=job_id, from_event=from_event))
    try:
        async for event in call:
            if matches(event):
                return event
    finally:
        call.cancel()
    raise AssertionError(f"job {job_id} ended without the awaited event")


def assert_resumed_once(history: list[training_pb2.JobEvent], checkpointed: int) -> None:
    """The job resumed exactly once, from a checkpoint at or after ``checkpointed``, and
    its step count continued from there instead of starting over; no event is missing."""
    resumed = [
        e
        for e in history
        if e.HasField("state_changed") and "resumed from checkpoint" in e.state_changed.message
    ]
    assert len(resumed) == 1
    resumed_at = int(resumed[0].state_changed.message.rsplit(" ", 1)[-1])
    assert resumed_at >= checkpointed > 0
    after = [e.step_loss.step for e in history[resumed[0].sequence :] if e.HasField("step_loss")]
    assert after and after[0] > resumed_at
    steps = [e.step_loss.step for e in history if e.HasField("step_loss")]
    assert steps == sorted(set(steps))
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
