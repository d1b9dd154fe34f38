"""Job lifecycle over gRPC: watching with reconnects, cancel, NaN failures, data-parallel runs."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import grpc.aio

from mesh.server.app import ServerSettings
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from workers.data.server import DataWorkerConfig
from workers.data.server import start as start_data
from workers.model_repo import ModelRepo

from .conftest import DataServer, Worker, eventually, finished, mlp_spec, wait_for_event

if TYPE_CHECKING:
    Stub = training_pb2_grpc.TrainingServiceAsyncStub


async def watch(stub: Stub, job_id: str, from_event: int = 0) -> list[training_pb2.JobEvent]:
    return [
        e
        async for e in stub.WatchJob(
            training_pb2.WatchJobRequest(job_id=job_id, from_event=from_event)
        )
    ]


async def test_watch_delivers_monotonic_steps_and_reconnecting_loses_nothing(
    worker: Worker,
) -> None:
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=mlp_spec()))

    # Read a few events live, drop the connection, reconnect from the next sequence.
    first: list[training_pb2.JobEvent] = []
    call = worker.stub.WatchJob(training_pb2.WatchJobRequest(job_id=job.id))
    async for event in call:
        first.append(event)
        if len(first) == 3:
            break
    call.cancel()
    rest = await watch(worker.stub, job.id, from_event=first[-1].sequence + 1)
    history = await watch(worker.stub, job.id)

    assert [e.SerializeToString() for e in first + rest] == [e.SerializeToString() for e in history]
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    states = [e.state_changed.state for e in history if e.HasField("state_changed")]
    assert states == [
        training_pb2.JOB_STATE_QUEUED,
        training_pb2.JOB_STATE_RUNNING,
        training_pb2.JOB_STATE_SUCCEEDED,
    ]
    steps = [e.step_loss for e in history if e.HasField("step_loss")]
    numbers = [s.step for s in steps]
    assert numbers == sorted(set(numbers)) and len(numbers) >= 10
    assert all(s.loss > 0 and s.examples_per_second > 0 and s.eta_seconds >= 0 for s in steps)
    assert steps[-1].eta_seconds == 0
    assert steps[-1].loss < steps[0].loss
    epochs = [e.epoch_metrics for e in history if e.HasField("epoch_metrics")]
    assert [m.epoch for m in epochs] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "val_accuracy", "val_f1"} <= set(epochs[-1].metrics)
    published = [e.published for e in history if e.HasField("published")]
    assert [p.version for p in published] == ["1"]
    final = await worker.stub.GetJob(training_pb2.GetJobRequest(job_id=job.id))
    assert final.last_event == history[-1].sequence

    # from_event past the end of a finished job: nothing more, the stream just ends.
    assert await watch(worker.stub, job.id, from_event=final.last_event + 1) == []


async def test_cancel_stops_the_job_and_removes_its_artifacts(worker: Worker) -> None:
    spec = mlp_spec(epochs=500, checkpoint_interval_steps=5, model_name="cancelled")
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    # Wait until it has trained and checkpointed, so there is something to clean up.
    await wait_for_event(worker.stub, job.id, lambda e: e.HasField("checkpoint"))
    job_dir = worker.model_repo.parent / "artifacts" / "jobs" / job.id
    assert job_dir.exists()

    cancelled = await worker.stub.CancelJob(training_pb2.CancelJobRequest(job_id=job.id))
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
    assert 0 < cancelled.step < cancelled.total_steps
    assert not job_dir.exists()
    assert ModelRepo(str(worker.model_repo)).list_versions("cancelled") == []
    history = await watch(worker.stub, job.id)
    assert history[-1].state_changed.state == training_pb2.JOB_STATE_CANCELLED
    # Cancelling a finished job returns it unchanged.
    again = await worker.stub.CancelJob(training_pb2.CancelJobRequest(job_id=job.id))
    assert again == cancelled


async def test_non_finite_loss_fails_the_job_and_publishes_nothing(worker: Worker) -> None:
    spec = mlp_spec(model_name="exploding")
    spec.dataset.name = "line"
    spec.optimizer.kind = training_pb2.OPTIMIZER_KIND_SGD
    spec.optimizer.learning_rate = 1e6
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    done = await finished(worker.stub, job.id)
    assert done.state == training_pb2.JOB_STATE_FAILED, done
    assert "loss became" in done.message and "learning_rate" in done.message, done.message
    assert not done.HasField("published")
    assert ModelRepo(str(worker.model_repo)).list_versions("exploding") == []
    failed = await worker.stub.ListJobs(
        training_pb2.ListJobsRequest(state=training_pb2.JOB_STATE_FAILED)
    )
    assert [j.id for j in failed.jobs] == [job.id]


async def test_world_size_two_trains_to_comparable_accuracy(worker: Worker) -> None:
    single = await worker.stub.SubmitJob(
        training_pb2.SubmitJobRequest(spec=mlp_spec(model_name="single"))
    )
    double = await worker.stub.SubmitJob(
        training_pb2.SubmitJobRequest(spec=mlp_spec(model_name="ddp", world_size=2))
    )
    one = await finished(worker.stub, single.id)
    two = await finished(worker.stub, double.id)
    assert one.state == two.state == training_pb2.JOB_STATE_SUCCEEDED, (one.message, two.message)
    # Each rank takes half the examples per step: half the steps for the same epochs.
    assert two.total_steps == one.total_steps // 2
    assert two.metrics["val_accuracy"] >= 0.9
    assert abs(two.metrics["val_accuracy"] - one.metrics["val_accuracy"]) <= 0.05
    listed = await worker.stub.ListJobs(training_pb2.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [double.id, single.id]  # newest first
    only = await worker.stub.ListJobs(training_pb2.ListJobsRequest(model_name="ddp"))
    assert [j.id for j in only.jobs] == [double.id]


async def test_cancel_of_a_queued_job(worker: Worker) -> None:
    # Two slots: fill them with long jobs so a third one waits in the queue.
    long = mlp_spec(epochs=500)
    running = [
        await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=long)) for _ in range(2)
    ]
    queued = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=long))
    job = await worker.stub.CancelJob(training_pb2.CancelJobRequest(job_id=queued.id))
    assert job.state == training_pb2.JOB_STATE_CANCELLED and job.step == 0
    assert not job.HasField("started_at")
    for r in running:
        await worker.stub.CancelJob(training_pb2.CancelJobRequest(job_id=r.id))

    async def states() -> list[int]:
        reply = await worker.stub.ListJobs(training_pb2.ListJobsRequest())
        return [j.state for j in reply.jobs]

    await eventually(states, lambda s: s == [training_pb2.JOB_STATE_CANCELLED] * 3)


async def test_negative_from_event_is_invalid(worker: Worker) -> None:
    try:
        await watch(worker.stub, "any", from_event=-1)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        raise AssertionError("from_event -1 was accepted")


async def test_a_crashed_training_process_restarts_from_its_checkpoint(worker: Worker) -> None:
    spec = mlp_spec(model_name="crashy", epochs=10, checkpoint_interval_steps=20)
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    await wait_for_event(worker.stub, job.id, lambda e: e.HasField("checkpoint"))
    pid = worker.manager.pid(job.id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the worker itself stays up
    done = await finished(worker.stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.attempts == 1 and done.step == done.total_steps
    messages = [e.state_changed.message for e in await watch(worker.stub, job.id)]
    assert (
        f"training process exited with code {-signal.SIGKILL}; restarting from checkpoint"
        in messages
    )
    assert any(m.startswith("resumed from checkpoint at step ") for m in messages)


async def test_a_data_service_outage_is_waited_out(worker: Worker, data_server: DataServer) -> None:
    spec = mlp_spec(model_name="patient", epochs=15, checkpoint_interval_steps=20)
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    event = await wait_for_event(worker.stub, job.id, lambda e: e.HasField("checkpoint"))
    port = data_server.serving.port
    await data_server.serving.drain(grace=0)
    # The training process loses its stream and exits for a retry; bring the data back.
    await wait_for_event(
        worker.stub,
        job.id,
        lambda e: "restarting from checkpoint" in e.state_changed.message,
        from_event=event.sequence,
    )
    data_server.serving = await start_data(
        DataWorkerConfig(server=ServerSettings(port=port), root=str(data_server.root))
    )
    done = await finished(worker.stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.attempts >= 1 and done.step == done.total_steps
