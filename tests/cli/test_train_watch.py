"""`meshserve train`'s watch across a training worker's restart: a real gRPC server plays a
training service whose worker dies mid-job (the stream breaks, GetJob is UNAVAILABLE for a
while) and comes back having resumed the job from its checkpoint."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from rich.console import Console

from cli.train import submit_and_watch
from protos.meshserve.training.v1 import training_pb2 as pb
from protos.meshserve.training.v1 import training_pb2_grpc

OUTAGE = "upstream unix:/tmp/worker.sock: [Errno 111] Connection refused"


class RestartingTraining(training_pb2_grpc.TrainingServiceServicer):
    """One job; its first watch breaks after two events, then GetJob is refused
    ``refusals`` times (the worker restarting) before the resumed job's events follow."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.watched_from: list[int] = []
        self.succeeded = False
        self._lock = threading.Lock()

    def _job(self, state: pb.JobState.ValueType) -> pb.Job:
        return pb.Job(id="job-1", state=state, total_steps=10)

    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job(pb.JOB_STATE_QUEUED)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._lock:
            if self.refusals > 0:
                self.refusals -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, OUTAGE)
        return self._job(pb.JOB_STATE_SUCCEEDED if self.succeeded else pb.JOB_STATE_RUNNING)

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        self.watched_from.append(request.from_event)
        running = pb.StateChanged(state=pb.JOB_STATE_RUNNING)
        if len(self.watched_from) == 1:
            yield pb.JobEvent(sequence=1, state_changed=running)
            yield pb.JobEvent(sequence=2, step_loss=pb.StepLoss(step=3, epoch=1, loss=0.5))
            context.abort(grpc.StatusCode.UNAVAILABLE, OUTAGE)
        resumed = pb.StateChanged(
            state=pb.JOB_STATE_RUNNING, message="resumed from checkpoint at step 2"
        )
        yield pb.JobEvent(sequence=3, state_changed=resumed)
        self.succeeded = True
        yield pb.JobEvent(sequence=4, state_changed=pb.StateChanged(state=pb.JOB_STATE_SUCCEEDED))

    # The watch needs none of these.
    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListJobs")

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "CancelJob")

    def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.ServicerContext
    ) -> pb.EvaluateResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Evaluate")


@pytest.fixture
def serve() -> Iterator[tuple[grpc.Server, grpc.Channel, RestartingTraining]]:
    servicer = RestartingTraining(refusals=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, channel, servicer
    finally:
        channel.close()
        server.stop(grace=None)


def test_a_watch_waits_out_the_training_service_and_resumes_after_the_last_event(
    serve: tuple[grpc.Server, grpc.Channel, RestartingTraining],
) -> None:
    _, channel, servicer = serve
    text = io.StringIO()
    job = submit_and_watch(channel, pb.JobSpec(), Console(file=text, width=200))
    assert job.state == pb.JOB_STATE_SUCCEEDED
    assert servicer.watched_from == [1, 3]
    assert servicer.refusals == 0
    shown = text.getvalue()
    assert f"training service unavailable ({OUTAGE}); waiting up to" in shown
    assert "resumed from checkpoint at step 2" in shown


def test_an_outage_longer_than_the_wait_fails_with_its_status(
    serve: tuple[grpc.Server, grpc.Channel, RestartingTraining],
) -> None:
    _, channel, servicer = serve
    servicer.refusals = 1000
    with pytest.raises(grpc.RpcError) as caught:
        submit_and_watch(channel, pb.JobSpec(), Console(file=io.StringIO()), outage_s=0.5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
