"""Separate processes: a data worker drains on SIGTERM, and `meshserve up` serves until SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from tests.workers.data.conftest import columns, header
from workers.data import wire
from workers.data.server import READY_PREFIX
from workers.data.service import SERVICE_NAME

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT = 60.0


async def spawn(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli.main",
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


async def test_meshserve_up_serves_uploads_streams_and_reflection_until_sigint(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    up = await spawn("up", "--data-port", "0", "--state-dir", str(state))
    worker_pid: int | None = None
    try:
        banner = await read_until(up, "Ctrl-C stops everything")
        match = re.search(r"data worker\s*│\s*(127\.0\.0\.1:\d+)\s*│\s*(\d+)", banner)
        assert match, banner
        address, worker_pid = match.group(1), int(match.group(2))
        assert f"grpcurl -plaintext {address} list" in banner

        async with grpc.aio.insecure_channel(address) as channel:
            stub = data_pb2_grpc.DataServiceStub(channel)

            async def requests() -> AsyncIterator[pb.CreateDatasetRequest]:
                for item in wire.upload_requests(header(), columns(60), records_per_message=16):
                    yield item

            created = await stub.CreateDataset(requests())
            assert created.num_examples == 60
            ids = [
                i
                async for batch in stub.StreamBatches(
                    pb.StreamBatchesRequest(dataset="toy", split=pb.SPLIT_ALL, batch_size=7)
                )
                for i in batch.example_ids
            ]
            assert ids == list(range(60))

            reflect = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = {
                s.name
                async for response in reflect(ask())
                for s in response.list_services_response.service
            }
            assert SERVICE_NAME in names

        assert (state / "data" / "toy" / "1" / "manifest.json").is_file()
        up.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(up.wait(), 40) == 0
        assert up.stdout is not None
        assert "meshserve stopped" in (await up.stdout.read()).decode()
        with pytest.raises(ProcessLookupError):
            os.kill(worker_pid, 0)  # `up` stopped and reaped its worker
        worker_pid = None
    finally:
        await stop(up)
        if worker_pid is not None:
            # The worker runs in its own session: killing `up` does not reach it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGKILL)


async def test_meshserve_up_fails_clearly_when_the_data_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mesh.cli.main",
            "up",
            "--data-port",
            str(port),
            "--state-dir",
            str(tmp_path / "state"),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(up.communicate(), START_TIMEOUT)
        finally:
            await stop(up)
    assert up.returncode == 1
    text = stderr.decode()
    assert f"cannot listen on 127.0.0.1:{port}" in text
    assert "data worker exited with status 1 before it was ready" in text
    assert "Traceback" not in text
