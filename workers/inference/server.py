"""Assembles and runs an inference worker: repository, cache, batchers, statistics, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from mesh.server.app import ServerSettings, Serving, serve_until_signal, start_server
from mesh.server.h2_front import start_fronted_server
from workers.inference.repository import ModelRepository
from workers.inference.service import InferenceServicer
from workers.inference.stats import Statistics
from workers.inference.worker import InferenceWorker
from workers.model_repo import ModelRepo

log = logging.getLogger(__name__)
#: The serving stacks a worker can use (WorkerSettings.serve_with).
SERVE_WITH = ("h2", "grpc")


@dataclass(frozen=True)
class WorkerSettings:
    """What an inference worker serves and how. Validated on construction."""

    model_repo: str
    device: str = "auto"
    #: Bytes of loaded weights to keep (GPU memory on CUDA); 0: no limit.
    memory_budget_bytes: int = 0
    poll_interval_s: float = 2.0
    #: False runs every request alone (the benchmark's "batching off").
    batching: bool = True
    #: torch intra-op threads for forward passes; 0 keeps torch's default (one per core).
    threads: int = 0
    #: Seconds to wait, before loading anything, for the sidecar's list of the versions
    #: the ring gives this worker (loaded first); 0: load every servable version at once.
    preload_wait_s: float = 0.0
    #: "h2": ModelInfer and ModelStreamInfer on the relay's HTTP/2 engine, the rest on
    #: grpc.aio behind it (mesh/server/h2_front.py, issue 17); "grpc": all on grpc.aio.
    serve_with: str = "h2"

    def __post_init__(self) -> None:
        if self.serve_with not in SERVE_WITH:
            raise ValueError(
                f"serve_with must be one of {', '.join(SERVE_WITH)}, got {self.serve_with!r}"
            )
        if not self.model_repo:
            raise ValueError("model_repo must not be empty")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
        if self.memory_budget_bytes < 0:
            raise ValueError(f"memory budget must be >= 0, got {self.memory_budget_bytes}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.preload_wait_s < 0:
            raise ValueError(f"preload wait must be >= 0, got {self.preload_wait_s}")
        if self.poll_interval_s < 0:
            raise ValueError(f"poll interval must be >= 0, got {self.poll_interval_s}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class RunningWorker:
    """A started worker: its server and its parts (for tests and embedding)."""

    serving: Serving
    servicer: InferenceServicer
    worker: InferenceWorker
    repository: ModelRepository


@asynccontextmanager
async def run_worker(
    settings: WorkerSettings,
    server: ServerSettings | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> AsyncIterator[RunningWorker]:
    """Starts a worker, loads the repository, yields it; drains and stops on exit.

    ``on_listening(address)`` runs once the server listens, before anything loads.
    """
    if settings.threads:
        # Process-wide: a worker process owns its torch thread pool.
        torch.set_num_threads(settings.threads)
    stats = Statistics()
    # Forward passes and loads run here, off the event loop. A few threads let one
    # model's pass overlap another's; torch's own intra-op threads do the rest.
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="inference")
    repository = ModelRepository(
        ModelRepo(settings.model_repo),
        stats,
        device=settings.torch_device(),
        memory_budget_bytes=settings.memory_budget_bytes,
        executor=executor,
        batching=settings.batching,
    )
    worker = InferenceWorker(repository, stats)
    servicer = InferenceServicer(worker)
    # NOT_SERVING until the repository's versions are loaded: a sidecar that mirrors this
    # health (in a Kubernetes pod it starts beside the worker) registers the instance
    # SERVING only then, so no request of a joining worker waits for a load.
    if settings.serve_with == "h2":
        serving = await start_fronted_server(
            server or ServerSettings(),
            [servicer.service()],
            servicer.hot_methods(),
            serving=False,
        )
    else:
        serving = await start_server(
            server or ServerSettings(), [servicer.service()], serving=False
        )
    if on_listening is not None:
        on_listening(serving.address)
    try:
        if settings.preload_wait_s:
            await _start_with_preload(repository, servicer, settings)
        else:
            await repository.start(settings.poll_interval_s or None)
        await serving.set_serving(True)
        servicer.ready = True
        yield RunningWorker(serving, servicer, worker, repository)
    finally:
        servicer.ready = False
        await serving.drain(grace=0)
        await repository.stop()
        # Unmaps every region and closes its descriptor; the objects stay the clients'.
        worker.shared_memory.close()
        executor.shutdown(wait=False, cancel_futures=True)


async def _start_with_preload(
    repository: ModelRepository, servicer: InferenceServicer, settings: WorkerSettings
) -> None:
    """Reads the repository, waits for the sidecar's preload list, loads it first.

    The sidecar asks the ring which versions will route here (mesh/routing/ownership.py);
    without an answer in time (no sidecar, an older one) everything servable loads.
    """
    await repository.start(settings.poll_interval_s or None, load=False)
    try:
        owned = await asyncio.wait_for(
            asyncio.shield(servicer.preload_request), settings.preload_wait_s
        )
    except TimeoutError:
        log.warning(
            "no preload list from the sidecar within %gs: loading every servable version",
            settings.preload_wait_s,
        )
        owned = None
    await repository.preload(owned)


async def serve_forever(settings: WorkerSettings, server: ServerSettings) -> None:
    def announce(address: str) -> None:
        # Machine-readable: tests and scripts that pass --port 0 read the port from here.
        print(f"inference worker listening on {address}", flush=True)
        sys.stdout.flush()

    # A worker waiting for a preload announces itself before loading: `meshserve run`
    # starts the sidecar, which sends the preload, only once it has read this line.
    early = announce if settings.preload_wait_s else None
    async with run_worker(settings, server, early) as running:
        if early is None:
            announce(running.serving.address)
        await serve_until_signal(running.serving)


def main(settings: WorkerSettings, server: ServerSettings) -> int:
    asyncio.run(serve_forever(settings, server))
    return 0
