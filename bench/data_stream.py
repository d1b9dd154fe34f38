"""Data service throughput: upload, and streaming an epoch in order, shuffled, and beyond the cache.

Run: ``python -m bench.data_stream [--examples N] [--features D] [--batch-size B]``.
Everything runs in one process over loopback gRPC, so the figures include
serialisation on both ends but no network.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator

import numpy as np
from rich.console import Console
from rich.table import Table

from mesh.server.testing import serve
from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from workers.data import wire
from workers.data.schema import Array
from workers.data.service import data_service
from workers.data.storage import DEFAULT_CHUNK_BYTES, DatasetStore


def _header(features: int) -> pb.DatasetHeader:
    return pb.DatasetHeader(
        name="bench",
        schema=pb.Schema(
            features=[pb.TensorSpec(name="x", data_type=pb.DATA_TYPE_FP32, shape=[features])],
            labels=[pb.TensorSpec(name="y", data_type=pb.DATA_TYPE_INT64)],
            task=pb.TASK_CLASSIFICATION,
            num_classes=10,
        ),
    )


async def _run(examples: int, features: int, batch_size: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    data: dict[str, Array] = {
        "x": rng.normal(size=(examples, features)).astype(np.float32),
        "y": rng.integers(0, 10, size=examples).astype(np.int64),
    }
    megabytes = (data["x"].nbytes + data["y"].nbytes) / 2**20
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as root:
        big_cache = DatasetStore(root)
        # A cache of two chunks: a shuffled epoch re-reads chunks for most batches.
        small_cache = DatasetStore(root, cache_bytes=2 * DEFAULT_CHUNK_BYTES)
        async with serve([data_service(big_cache)]) as (_, channel):
            stub = data_pb2_grpc.DataServiceStub(channel)

            async def requests() -> AsyncIterator[pb.CreateDatasetRequest]:
                for item in wire.upload_requests(_header(features), data):
                    yield item

            start = time.perf_counter()
            await stub.CreateDataset(requests())
            elapsed = time.perf_counter() - start
            rows.append(("upload (verify + stats + commit)", elapsed, megabytes / elapsed))

            async def epoch(
                label: str, stub: data_pb2_grpc.DataServiceAsyncStub, shuffle: bool
            ) -> None:
                request = pb.StreamBatchesRequest(
                    dataset="bench",
                    split=pb.SPLIT_ALL,
                    batch_size=batch_size,
                    shuffle=shuffle,
                    seed=1,
                )
                start = time.perf_counter()
                n = 0
                async for batch in stub.StreamBatches(request):
                    n += batch.size
                elapsed = time.perf_counter() - start
                assert n == examples
                rows.append((label, elapsed, megabytes / elapsed))

            await epoch("epoch in order (cold cache)", stub, shuffle=False)
            await epoch("epoch in order (warm cache)", stub, shuffle=False)
            await epoch("epoch shuffled (warm cache)", stub, shuffle=True)
        async with serve([data_service(small_cache)]) as (_, channel):
            stub = data_pb2_grpc.DataServiceStub(channel)
            await epoch("epoch shuffled (cache = 2 chunks)", stub, shuffle=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    rows = asyncio.run(_run(args.examples, args.features, args.batch_size))
    table = Table(
        title=f"data service: {args.examples} examples x {args.features} FP32 features, "
        f"batch {args.batch_size}"
    )
    for column in ("operation", "seconds", "MiB/s"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for label, seconds, rate in rows:
        table.add_row(label, f"{seconds:.2f}", f"{rate:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
