"""Separate processes: a data worker drains on SIGTERM, and `meshserve up` serves until SIGINT."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import grpc.aio
import pytest

from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from workers.data.server import READY_PREFIX

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT = 60.0


async def spawn(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *argv,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )


async def read_until(process: asyncio.subprocess.Process, pattern: str) -> str:
    """Stdout up to and including the first line matching ``pattern``."""
    assert process.stdout is not None
    seen = ""

    async def scan() -> str:
        nonlocal seen
        assert process.stdout is not None
        while line := (await process.stdout.readline()).decode():
            seen += line
            if re.search(pattern, line):
                return seen
        raise AssertionError(f"process ended before printing {pattern!r}; output:\n{seen}")

    return await asyncio.wait_for(scan(), START_TIMEOUT)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_sigterm_lets_an_in_flight_stream_finish_then_exits_zero(tmp_path: Path) -> None:
    worker = await spawn("worker", "data", "--port", "0", "--root", str(tmp_path / "data"))
    try:
        line = await read_until(worker, re.escape(READY_PREFIX))
        address = line.strip().rsplit(" ", 1)[-1]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = data_pb2_grpc.DataServiceStub(channel)
            # ~20 MB of batches: far more than flow control lets the server send
            # ahead, so the stream is still running when the signal arrives.
            created = await stub.CreateBuiltinDataset(
                pb.CreateBuiltinDatasetRequest(
                    name="big",
                    regression=pb.RegressionSource(num_examples=20_000, num_features=256),
                )
            )
            call = stub.StreamBatches(
                pb.StreamBatchesRequest(dataset="big", split=pb.SPLIT_ALL, batch_size=100)
            )
            first = await call.read()
            assert isinstance(first, pb.Batch)
            worker.send_signal(signal.SIGTERM)
            received = first.size
            while (batch := await call.read()) is not grpc.aio.EOF:
                assert isinstance(batch, pb.Batch)
                received += batch.size
            assert received == created.num_examples
            assert await call.code() == grpc.StatusCode.OK
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        await stop(worker)
