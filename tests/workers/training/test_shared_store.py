"""Two training workers on one registry: jobs are visible from both, and when the worker
running a job is SIGKILLed, the other adopts it and resumes it from its checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch

from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from registry.catalog import Catalog, Stage
from registry.jobs import ElasticJobClaims
from registry.schema import Indices
from workers.model_repo import ModelRepo

from .conftest import DataServer, eventually, finished, mlp_spec
from .processes import WorkerProcess, alive, children

pytestmark = pytest.mark.e2e


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.kill()


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

        checkpointed = 0
        async for event in stub_a.WatchJob(training_pb2.WatchJobRequest(job_id=job.id)):
            if event.HasField("checkpoint") and event.checkpoint.step >= 50:
                checkpointed = event.checkpoint.step
                break
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
    resumed = [
        e
        for e in history
        if e.HasField("state_changed") and "resumed from checkpoint" in e.state_changed.message
    ]
    assert len(resumed) == 1
    resumed_at = int(resumed[0].state_changed.message.rsplit(" ", 1)[-1])
    assert resumed_at >= checkpointed > 0
    # The step count continued from the checkpoint instead of starting over.
    after = [e.step_loss.step for e in history[resumed[0].sequence :] if e.HasField("step_loss")]
    assert after and after[0] > resumed_at
    steps = [e.step_loss.step for e in history if e.HasField("step_loss")]
    assert steps == sorted(set(steps))
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert ModelRepo(str(tmp_path / "models")).list_versions("shared") == [1]
    # The finished job's claim is released, and B recorded the version in the catalog.
    assert await claims.holder(job.id) is None
    [entry] = await Catalog(es, indices).list("shared")
    assert entry.stage == Stage.CANDIDATE
    assert entry.version.version == "1"
    assert entry.version.lineage["job_id"] == job.id
    assert entry.version.metrics["val_accuracy"] == done.metrics["val_accuracy"] >= 0.9
