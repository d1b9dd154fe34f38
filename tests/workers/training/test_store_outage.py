"""A job store that restarts mid-job (``up`` restarting its store): the job waits it out and
succeeds with every event recorded; a watch during the outage is UNAVAILABLE, which clients
wait out, not INTERNAL."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest

from mesh.server.app import ServerSettings
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from registry.connect import StoreSettings
from registry.embedded import EmbeddedStore
from registry.jobs import ElasticJobStore
from registry.schema import Indices, ensure_schema
from workers.training.manager import WorkerSettings
from workers.training.server import training_worker

from .conftest import DataServer, finished, mlp_spec, wait_for_event


async def test_a_job_waits_out_a_store_restart_and_a_watch_meanwhile_is_unavailable(
    tmp_path: Path, data_server: DataServer
) -> None:
    store = EmbeddedStore(tmp_path / "store", advertise=False)
    async with store:
        client = StoreSettings(store.url, request_timeout=2.0).client()
        try:
            indices = Indices("outage")
            await ensure_schema(client, indices)
            settings = WorkerSettings(
                artifacts_url=str(tmp_path / "artifacts"),
                model_repo_url=str(tmp_path / "models"),
                data_address=data_server.address,
            )
            jobs = ElasticJobStore(client, indices)
            async with (
                training_worker(settings, ServerSettings(), store=jobs) as running,
                grpc.aio.insecure_channel(running.serving.address) as channel,
            ):
                stub = training_pb2_grpc.TrainingServiceStub(channel)
                spec = mlp_spec(epochs=20, batch_size=8, log_every_steps=1)
                job = await stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
                await wait_for_event(stub, job.id, lambda e: e.HasField("step_loss"))

                await store.__aexit__(None, None, None)  # the store stops mid-job
                # Served from memory, which never runs ahead of the store: still running.
                now = await stub.GetJob(training_pb2.GetJobRequest(job_id=job.id))
                assert now.state == training_pb2.JOB_STATE_RUNNING
                with pytest.raises(grpc.aio.AioRpcError) as watched:
                    await wait_for_event(stub, job.id, lambda e: False)
                assert watched.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "job store is unreachable" in (watched.value.details() or "")
                await store.__aenter__()  # same data dir, same port

                done = await finished(stub, job.id)
                assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
                history = await jobs.events(job.id, 1)
                assert [e.sequence for e in history] == list(range(1, done.last_event + 1))
        finally:
            await client.close()
