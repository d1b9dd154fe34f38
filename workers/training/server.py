"""Assembles a training worker: data-service channel, job store, job manager, gRPC server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import fsspec
import grpc.aio

from mesh.server.app import ServerSettings, Serving, serve_until_signal, start_server
from workers.training.batches import CHANNEL_OPTIONS
from workers.training.datasets import DataServiceDatasets
from workers.training.jobstore import JobStore, LocalJobStore
from workers.training.manager import JobManager, WorkerSettings
from workers.training.publish import VersionRecorder
from workers.training.service import training_service

#: The line printed once the worker listens; tests and `meshserve up` read the port from it.
READY_PREFIX = "meshserve training worker listening on "


def default_state_dir(artifacts_url: str) -> str:
    """``<artifacts>/state`` when the artifacts are on local disk; else an explicit one is needed."""
    fs, path = fsspec.core.url_to_fs(artifacts_url)
    if "file" not in fs.protocol and "local" not in fs.protocol:
        raise ValueError(
            f"--state is required when --artifacts is not a local directory ({artifacts_url})"
        )
    return os.path.join(str(path), "state")


@dataclass
class TrainingWorker:
    serving: Serving
    manager: JobManager


@asynccontextmanager
async def training_worker(
    settings: WorkerSettings,
    server: ServerSettings,
    store: JobStore | None = None,
    recorder: VersionRecorder | None = None,
) -> AsyncIterator[TrainingWorker]:
    """Starts the worker (resuming unfinished jobs); drains and stops it on exit."""
    channel = grpc.aio.insecure_channel(settings.data_address, options=CHANNEL_OPTIONS)
    manager = JobManager(
        settings,
        store or LocalJobStore(default_state_dir(settings.artifacts_url)),
        DataServiceDatasets(channel),
        recorder,
    )
    try:
        serving = await start_server(server, [training_service(manager)])

        async def stop_jobs() -> None:
            await manager.close()

        serving.on_drain(stop_jobs)
        try:
            await manager.recover()
            yield TrainingWorker(serving, manager)
        finally:
            await serving.drain(grace=0)
    finally:
        await manager.close()
        await channel.close()


async def run(settings: WorkerSettings, server: ServerSettings, state_dir: str | None) -> None:
    """Runs a worker until SIGTERM/SIGINT; prints the address it listens on."""
    store = LocalJobStore(state_dir or default_state_dir(settings.artifacts_url))
    async with training_worker(settings, server, store) as worker:
        print(f"{READY_PREFIX}{worker.serving.address}", flush=True)
        await serve_until_signal(worker.serving)
