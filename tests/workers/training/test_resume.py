"""A worker SIGKILLed mid-job resumes the job from its checkpoint when it restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest

from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from workers.model_repo import ModelRepo

from .conftest import (
    DataServer,
    assert_resumed_once,
    eventually,
    finished,
    mlp_spec,
    wait_for_event,
)
from .processes import WorkerProcess, alive, children

pytestmark = pytest.mark.e2e


@pytest.fixture
async def spawn_worker(
    tmp_path: Path, data_server: DataServer
) -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.kill()


async def test_sigkilled_worker_resumes_the_job_from_its_checkpoint(
    tmp_path: Path, data_server: DataServer, spawn_worker: list[WorkerProcess]
) -> None:
    args = [
        "--artifacts",
        str(tmp_path / "artifacts"),
        "--model-repo",
        str(tmp_path / "models"),
        "--data",
        data_server.address,
    ]
    first = WorkerProcess(args)
    spawn_worker.append(first)
    # 300 steps: far more than train between the step-50 checkpoint reaching this test
    # and the SIGKILL, yet few enough that the resumed run ends within the poll's
    # deadline on a loaded 2-core box (1,200 steps did not: 700 done after 90 s).
    spec = mlp_spec(model_name="resumed", epochs=15, checkpoint_interval_steps=25)
    async with grpc.aio.insecure_channel(await first.address()) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        job = await stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
        event = await wait_for_event(
            stub, job.id, lambda e: e.HasField("checkpoint") and e.checkpoint.step >= 50
        )
        checkpointed = event.checkpoint.step
    trainers = children(first.proc.pid)
    assert trainers  # the job's training process
    first.kill()  # SIGKILL: no drain, no goodbye
    # The orphaned training process notices and exits rather than train on unsupervised.
    await eventually(
        lambda: asyncio.to_thread(lambda: [p for p in trainers if alive(p)]), lambda a: a == []
    )

    second = WorkerProcess(args)
    spawn_worker.append(second)
    async with grpc.aio.insecure_channel(await second.address()) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        done = await finished(stub, job.id)
        history = [e async for e in stub.WatchJob(training_pb2.WatchJobRequest(job_id=job.id))]

    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.attempts == 1
    assert done.step == done.total_steps == 15 * 20
    assert_resumed_once(history, checkpointed)
    assert done.metrics["val_accuracy"] >= 0.9
    assert ModelRepo(str(tmp_path / "models")).list_versions("resumed") == [1]
