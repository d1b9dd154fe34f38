"""Assembles a training worker: data-service channel, job store, job manager, gRPC server."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import fsspec
import grpc.aio

from mesh.server.app import ServerSettings, Serving, serve_until_signal, start_server
from registry.connect import StoreSettings
from registry.jobs import DEFAULT_CLAIM_TTL
from registry.store import open_store
from workers.training.batches import CHANNEL_OPTIONS
from workers.training.datasets import DataServiceDatasets
from workers.training.jobstore import JobStore, LocalJobStore
from workers.training.manager import JobManager, WorkerSettings
from workers.training.ownership import JobClaims
from workers.training.publish import VersionRecorder, record_published
from workers.training.recorder import CatalogRecorder
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
    claims: JobClaims | None = None,
) -> AsyncIterator[TrainingWorker]:
    """Starts the worker (resuming unfinished jobs); drains and stops it on exit.

    ``claims`` must be given with a store other workers share (see ``ownership``).
    """
    channel = grpc.aio.insecure_channel(settings.data_address, options=CHANNEL_OPTIONS)
    manager = JobManager(
        settings,
        store or LocalJobStore(default_state_dir(settings.artifacts_url)),
        DataServiceDatasets(channel),
        recorder,
        claims=claims,
    )
    try:
        serving = await start_server(server, [training_service(manager)])

        async def stop_jobs() -> None:
            await manager.close()

        serving.on_drain(stop_jobs)
        try:
            if recorder is not None:
                # Versions published before this worker recorded into the catalog.
                await record_published(manager.repo, recorder)
            await manager.recover()
            yield TrainingWorker(serving, manager)
        finally:
            await serving.drain(grace=0)
    finally:
        await manager.close()
        await channel.close()


def worker_id() -> str:
    """This process's owner id in job claims: host, pid and a random part (pids recur)."""
    return f"training-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run(
    settings: WorkerSettings,
    server: ServerSettings,
    state_dir: str | None,
    registry: StoreSettings | None = None,
    claim_ttl: float = DEFAULT_CLAIM_TTL,
) -> None:
    """Runs a worker until SIGTERM/SIGINT; prints the address it listens on.

    With ``registry``, jobs live in Elasticsearch (shared with every training worker of
    the mesh, under claims) and published versions go into the model catalog; without,
    jobs live in ``state_dir`` and only ``lineage.json`` records a version.
    """
    async with AsyncExitStack() as stack:
        store: JobStore
        recorder: VersionRecorder | None = None
        claims: JobClaims | None = None
        if registry is not None:
            shared = await stack.enter_async_context(open_store(registry))
            store = shared.jobs()
            claims = shared.job_claims(worker_id(), ttl=claim_ttl)
            recorder = CatalogRecorder(shared.catalog())
        else:
            store = LocalJobStore(state_dir or default_state_dir(settings.artifacts_url))
        worker = await stack.enter_async_context(
            training_worker(settings, server, store, recorder, claims)
        )
        print(f"{READY_PREFIX}{worker.serving.address}", flush=True)
        await serve_until_signal(worker.serving)
