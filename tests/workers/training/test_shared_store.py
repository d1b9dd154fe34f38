"""Training workers sharing one registry: jobs are visible from all; a job whose worker
died (or lost its claim) is adopted and resumed from its checkpoint, never run twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch

from mesh.server.app import ServerSettings
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from registry.catalog import Catalog, Stage
from registry.jobs import ElasticJobClaims, ElasticJobStore
from registry.schema import Indices
from workers.model_repo import ModelRepo
from workers.training.manager import WorkerSettings
from workers.training.server import training_worker

from .conftest import (
    DataServer,
    assert_resumed_once,
    eventually,
    finished,
    mlp_spec,
    wait_for_event,
)
from .processes import WorkerProcess, alive, children


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.kill()


@pytest.mark.e2e
async def test_a_job_of_a_killed_worker_is_resumed_by_another(
    tmp_path: Path,
    data_server: DataServer,
    store_url: str,
    es: AsyncElasticsearch,
    indices: Indices,
    workers: list[WorkerProcess],
) -> None:
    # Shared artifacts and model repository (one filesystem), shared registry.
    args = [
        *("--artifacts", str(tmp_path / "artifacts")),
        *("--model-repo", str(tmp_path / "models")),
        *("--data", data_server.address),
        *("--es", store_url, "--prefix", indices.prefix),
        *("--job-claim-ttl", "2"),
    ]
    a, b = WorkerProcess(args), WorkerProcess(args)
    workers += [a, b]
    async with (
        grpc.aio.insecure_channel(await a.address()) as channel_a,
        grpc.aio.insecure_channel(await b.address()) as channel_b,
    ):
        stub_a = training_pb2_grpc.TrainingServiceStub(channel_a)
        stub_b = training_pb2_grpc.TrainingServiceStub(channel_b)
        spec = mlp_spec(model_name="shared", epochs=30, checkpoint_interval_steps=25)
        job = await stub_a.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))

        # B sees A's job at once, but does not run it: A holds its claim.
        seen = await stub_b.GetJob(training_pb2.GetJobRequest(job_id=job.id))
        assert seen.id == job.id and seen.spec == job.spec
        listed = await stub_b.ListJobs(training_pb2.ListJobsRequest())
        assert [j.id for j in listed.jobs] == [job.id]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub_b.CancelJob(training_pb2.CancelJobRequest(job_id=job.id))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert children(b.proc.pid) == []  # B trains nothing

        event = await wait_for_event(
            stub_a, job.id, lambda e: e.HasField("checkpoint") and e.checkpoint.step >= 50
        )
        checkpointed = event.checkpoint.step
        claims = ElasticJobClaims(es, indices, "test-observer")
        holder = await claims.holder(job.id)
        assert holder is not None and holder.owner.endswith(f"-{a.proc.pid}-{holder.owner[-6:]}")
        trainers = children(a.proc.pid)
        a.kill()  # SIGKILL: A's claim is never released; it lapses after 2 s
        await eventually(
            lambda: asyncio.to_thread(lambda: [p for p in trainers if alive(p)]),
            lambda left: left == [],
        )

        # B adopts the job once the claim lapsed; its watch (polling the store) sees it all.
        done = await finished(stub_b, job.id)
        history = [e async for e in stub_b.WatchJob(training_pb2.WatchJobRequest(job_id=job.id))]

    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.attempts == 1
    assert done.step == done.total_steps == 30 * 20
    assert_resumed_once(history, checkpointed)
    assert ModelRepo(str(tmp_path / "models")).list_versions("shared") == [1]
    # The finished job's claim is released, and B recorded the version in the catalog.
    assert await claims.holder(job.id) is None
    [entry] = await Catalog(es, indices).list("shared")
    assert entry.stage == Stage.CANDIDATE
    assert entry.version.version == "1"
    assert entry.version.lineage["job_id"] == job.id
    assert entry.version.metrics["val_accuracy"] == done.metrics["val_accuracy"] >= 0.9


async def test_a_worker_that_loses_a_claim_stops_the_job_and_leaves_it_intact(
    tmp_path: Path, data_server: DataServer, es: AsyncElasticsearch, indices: Indices
) -> None:
    settings = WorkerSettings(
        artifacts_url=str(tmp_path / "artifacts"),
        model_repo_url=str(tmp_path / "models"),
        data_address=data_server.address,
        adopt_interval_seconds=0.5,
    )
    claims = ElasticJobClaims(es, indices, "slow-worker", ttl=1.5)
    async with (
        training_worker(
            settings, ServerSettings(), ElasticJobStore(es, indices), None, claims
        ) as w,
        grpc.aio.insecure_channel(w.serving.address) as channel,
    ):
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        spec = mlp_spec(model_name="contested", epochs=25, checkpoint_interval_steps=20)
        job = await stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
        await wait_for_event(stub, job.id, lambda e: e.HasField("checkpoint"))
        pid = w.manager.pid(job.id)
        assert pid is not None

        # Another worker whose clock says the claim lapsed takes it (as after a long pause).
        later = datetime.now(UTC) + timedelta(seconds=30)
        thief = ElasticJobClaims(es, indices, "thief", ttl=60, clock=lambda: later)
        assert await thief.claim(job.id)

        # The next renewal fails: the worker kills the training process and lets go.
        await eventually(lambda: asyncio.to_thread(alive, pid), lambda a: not a)
        await eventually(lambda: asyncio.sleep(0, w.manager.pid(job.id)), lambda p: p is None)
        stopped = await stub.GetJob(training_pb2.GetJobRequest(job_id=job.id))
        assert stopped.state == training_pb2.JOB_STATE_RUNNING  # nothing final written
        assert (tmp_path / "artifacts" / "jobs" / job.id / "checkpoint.pt").is_file()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CancelJob(training_pb2.CancelJobRequest(job_id=job.id))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # Once the thief lets go, the worker adopts the job again and finishes it.
        await thief.release(job.id)
        done = await finished(stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.step == done.total_steps
    messages = [
        e.state_changed.message
        async for e in _events(es, indices, job.id)
        if e.HasField("state_changed")
    ]
    assert any(m.startswith("resumed from checkpoint at step ") for m in messages)


async def _events(
    es: AsyncElasticsearch, indices: Indices, job_id: str
) -> AsyncIterator[training_pb2.JobEvent]:
    for event in await ElasticJobStore(es, indices).events(job_id, 1):
        yield event
