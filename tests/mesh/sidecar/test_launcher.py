"""``meshserve run``: worker and sidecar as one unit, stopped in the right order."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch

from mesh.sidecar.launcher import parse_ready, worker_command
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.directory import read_live
from registry.schema import Indices

REPO = Path(__file__).resolve().parents[3]


def test_ready_line_and_default_command() -> None:
    assert parse_ready("w1 listening on 127.0.0.1:5000 pid 3") == "127.0.0.1:5000"
    assert parse_ready("loading weights") is None
    assert worker_command("data", None, ["--root", "x"])[-6:] == [
        "worker",
        "data",
        "--port",
        "0",
        "--root",
        "x",
    ]
    assert worker_command("data", "python -m w 'a b'", ["-v"]) == ["python", "-m", "w", "a b", "-v"]


@pytest.fixture
def launched(store_url: str, indices: Indices) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    """``meshserve run inference`` with a fake worker; yields (process, sidecar address, worker pid)."""
    command = f"{shlex.quote(sys.executable)} -m tests.mesh.sidecar.worker_proc w9"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mesh.cli.main", "run", "inference",
            f"--worker-command={command}", "--mtls=DISABLE", "--drain-delay=0.5",
            f"--es={store_url}", f"--prefix={indices.prefix}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        worker_line = process.stdout.readline()
        assert worker_line.startswith("w9 listening on "), worker_line
        sidecar_line = process.stdout.readline()
        assert sidecar_line.startswith("sidecar listening on "), sidecar_line
        yield process, sidecar_line.split()[3], int(worker_line.split()[-1])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie awaiting its parent's wait() is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _until(predicate: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert loop.time() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


@pytest.mark.e2e
async def test_run_serves_through_the_sidecar_and_sigterm_stops_both(
    launched: tuple[subprocess.Popen[str], str, int], es: AsyncElasticsearch, indices: Indices
) -> None:
    process, address, worker_pid = launched

    async def serving() -> bool:
        live = await read_live(es, indices, datetime.now(UTC), service="inference")
        return any(i.status == "SERVING" for i in live.instances.values())

    await _until(serving, "the instance is SERVING in the registry")
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name="m"), timeout=10
        )
    assert reply.id == "w9"
    process.send_signal(signal.SIGTERM)
    await _until(lambda: process.poll() is not None, "the launcher exits")
    assert process.returncode == 0

    async def deregistered() -> bool:
        live = await read_live(es, indices, datetime.now(UTC), service="inference")
        return not live.instances

    await _until(deregistered, "the instance is deregistered")
    assert not _alive(worker_pid)


@pytest.mark.e2e
async def test_a_dying_worker_takes_its_sidecar_down(
    launched: tuple[subprocess.Popen[str], str, int], es: AsyncElasticsearch, indices: Indices
) -> None:
    process, _, worker_pid = launched
    os.kill(worker_pid, signal.SIGKILL)
    await _until(lambda: process.poll() is not None, "the launcher exits")

    async def deregistered() -> bool:
        live = await read_live(es, indices, datetime.now(UTC), service="inference")
        return not live.instances

    await _until(deregistered, "the instance is deregistered")
