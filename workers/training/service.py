"""The TrainingService servicer: protobuf in, one JobManager call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from mesh.server.app import Service
from mesh.telemetry.propagation import continued
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from workers.training import evaluate
from workers.training.manager import JobManager

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    async def SubmitJob(
        self, request: training_pb2.SubmitJobRequest, context: Context
    ) -> training_pb2.Job:
        # The dataset lookup joins the caller's trace (gateway → sidecar → data service).
        with continued(tuple(context.invocation_metadata() or ())):
            return await self.manager.submit(request.spec)

    async def GetJob(
        self, request: training_pb2.GetJobRequest, context: Context
    ) -> training_pb2.Job:
        return await self.manager.get(request.job_id)

    async def ListJobs(
        self, request: training_pb2.ListJobsRequest, context: Context
    ) -> training_pb2.ListJobsResponse:
        jobs = await self.manager.list(request.state, request.model_name)
        return training_pb2.ListJobsResponse(jobs=jobs)

    async def CancelJob(
        self, request: training_pb2.CancelJobRequest, context: Context
    ) -> training_pb2.Job:
        return await self.manager.cancel(request.job_id)

    async def WatchJob(
        self, request: training_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[training_pb2.JobEvent]:
        async for event in self.manager.watch(request.job_id, request.from_event):
            yield event

    async def Evaluate(
        self, request: training_pb2.EvaluateRequest, context: Context
    ) -> training_pb2.EvaluateResponse:
        m = self.manager
        return await evaluate.evaluate(m.repo, m.datasets, m.settings.data_address, request)


def training_service(manager: JobManager) -> Service:
    servicer = TrainingServicer(manager)
    return Service(
        SERVICE_NAME,
        lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server),
    )
