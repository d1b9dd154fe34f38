"""Fixtures for the data service tests: a store in a temporary directory and a server on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import numpy as np
import pytest

from mesh.server.app import Serving
from mesh.server.testing import serve
from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from workers.data.schema import Array
from workers.data.service import data_service
from workers.data.storage import DatasetStore

#: Small chunk files so that even tiny test datasets span several of them.
CHUNK_BYTES = 256


@dataclass
class Server:
    serving: Serving
    channel: grpc.aio.Channel
    stub: data_pb2_grpc.DataServiceAsyncStub
    store: DatasetStore
    root: Path


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore(str(tmp_path / "data"), chunk_bytes=CHUNK_BYTES)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    root = tmp_path / "data"
    store = DatasetStore(str(root), chunk_bytes=CHUNK_BYTES)
    async with serve([data_service(store)]) as (serving, channel):
        yield Server(serving, channel, data_pb2_grpc.DataServiceStub(channel), store, root)


def columns(n: int, seed: int = 0) -> dict[str, Array]:
    """``n`` examples: features x (FP32 [3]) whose first element is the example's position,
    labels y (INT64, 4 classes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return {"x": x, "y": (np.arange(n) % 4).astype(np.int64)}


def header(name: str = "toy", version: str = "", **split: float) -> pb.DatasetHeader:
    return pb.DatasetHeader(
        name=name,
        version=version,
        description="a toy dataset",
        schema=pb.Schema(
            features=[pb.TensorSpec(name="x", data_type=pb.DATA_TYPE_FP32, shape=[3])],
            labels=[pb.TensorSpec(name="y", data_type=pb.DATA_TYPE_INT64, shape=[])],
            task=pb.TASK_CLASSIFICATION,
            num_classes=4,
        ),
        split=pb.SplitSpec(**split),  # type: ignore[arg-type]
    )


def committed_files(root: Path) -> list[Path]:
    """Every file under the root (the store writes no empty marker files)."""
    return sorted(p for p in root.rglob("*") if p.is_file())
