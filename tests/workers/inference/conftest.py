"""Fixtures: a model repository of tiny TorchScript models, and an in-process worker over it."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import pytest
from torch import nn

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from workers.inference import testing
from workers.inference.server import RunningWorker, WorkerSettings, run_worker


@dataclass
class Template:
    path: Path
    modules: dict[str, nn.Module]


@pytest.fixture(scope="session")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """Scripted once per session; tests that change the repository get a copy."""
    path = tmp_path_factory.mktemp("template") / "repo"
    modules = testing.populate(str(path))
    return Template(path, modules)


@pytest.fixture
def model_repo(template_repo: Template, tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    shutil.copytree(template_repo.path, path)
    return path


@dataclass
class Client:
    running: RunningWorker
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceAsyncStub


@asynccontextmanager
async def worker_client(model_repo: Path, device: str) -> AsyncIterator[Client]:
    """A worker on ``device`` serving ``model_repo``, and a client connected to it."""
    settings = WorkerSettings(str(model_repo), device=device, poll_interval_s=0)
    async with run_worker(settings) as running:
        channel = grpc.aio.insecure_channel(
            running.serving.address, options=running.serving.settings.channel_options()
        )
        try:
            yield Client(running, channel, pb_grpc.GRPCInferenceServiceStub(channel))
        finally:
            await channel.close()


@pytest.fixture
async def client(model_repo: Path) -> AsyncIterator[Client]:
    async with worker_client(model_repo, "cpu") as connected:
        yield connected
