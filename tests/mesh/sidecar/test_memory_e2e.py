"""Processes: memory a sidecar and its inference worker take for large messages comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.support.processes import Launched
from workers.inference import testing

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]

MB = 1_000_000
#: What a client such as tritonclient allows itself (2 GiB).
CLIENT_LIMIT = 2**31 - 1


def status_kib(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of ``pid`` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def mesh(tmp_path: Path, store_url: str) -> Iterator[tuple[str, Launched, Launched]]:
    """An inference worker serving ``doubler`` (FP32 [-1] → x*2) behind a plaintext sidecar."""
    repo = str(tmp_path / "repo")
    config = testing.model_config(
        "doubler",
        [("x", testing.FP32, [-1])],
        [("y", testing.FP32, [-1])],
        max_batch_size=0,
        queue_delay_us=None,
    )
    testing.publish(repo, config, testing.Doubler())
    started: list[Launched] = []
    try:
        worker = Launched(
            "cli.main", "worker", "inference", "--model-repo", repo, "--port", "0",
            "--poll-interval", "0", name="worker",
        )  # fmt: skip
        started.append(worker)
        sidecar = Launched(
            "cli.main", "sidecar", "--service=inference", f"--app={worker.address()}",
            "--mtls=DISABLE", f"--es={store_url}", f"--prefix=mem{tmp_path.name[-8:].lower()}",
            name="sidecar",
        )  # fmt: skip
        started.append(sidecar)
        yield sidecar.address("sidecar"), sidecar, worker
    finally:
        for process in reversed(started):
            process.stop()


async def infer(channel: grpc.aio.Channel, size: int) -> str:
    """One ModelInfer of ``size`` bytes of FP32; "ok" or the status code's name."""
    request = pb.ModelInferRequest(model_name="doubler")
    request.inputs.add(name="x", datatype="FP32", shape=[size // 4])
    request.raw_input_contents.append(bytes(size))
    try:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=240)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    assert len(reply.raw_output_contents[0]) == size
    return "ok"


async def test_memory_comes_back_after_four_concurrent_large_requests(
    mesh: tuple[str, Launched, Launched],
) -> None:
    address, sidecar, worker = mesh
    options = [
        ("grpc.max_send_message_length", CLIENT_LIMIT),
        ("grpc.max_receive_message_length", CLIENT_LIMIT),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        assert await infer(channel, MB) == "ok"  # model loaded, connections up
        before = {p.name: status_kib(p.pid, "VmRSS") for p in (sidecar, worker)}
        # Three under the default 256 MiB limit, one over it (refused by the worker).
        results = await asyncio.gather(*(infer(channel, n * MB) for n in (250, 250, 250, 300)))
    assert sorted(results) == ["RESOURCE_EXHAUSTED", "ok", "ok", "ok"]
    # The messages did reach the worker, which decodes them whole: it grew by more than one.
    peak = status_kib(worker.pid, "VmHWM")
    assert peak - before[worker.name] > 200 * 1000, (worker.name, before, peak)
    # The sidecar's relay streams them under flow control and never holds a whole message
    # (a unary response is held only up to 512 KiB): its peak stays far below one message.
    sidecar_peak = status_kib(sidecar.pid, "VmHWM")
    assert sidecar_peak - before[sidecar.name] < 100 * 1000, (sidecar.name, before, sidecar_peak)
    # Trimming runs on its own thread, about once a second: poll, with a generous deadline.
    deadline = time.monotonic() + 60
    while True:
        now = {p.name: status_kib(p.pid, "VmRSS") for p in (sidecar, worker)}
        if all(now[name] <= before[name] * 1.2 for name in before):
            break
        assert time.monotonic() < deadline, f"RSS KiB before {before}, still {now}"
        await asyncio.sleep(0.5)
