"""``meshserve run``: worker and sidecar as one unit, stopped in the right order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch

from cli.main import build_parser
from mesh.server.lifeline import FOLDER_ENV
from mesh.server.private import PrivateSocket
from mesh.server.sidecar_secret import HEADER, read_secret
from mesh.sidecar.launcher import (
    LISTEN_ENV,
    LIVENESS_ENV,
    SECRET_FILE_ENV,
    door,
    parse_ready,
    unit_status,
    worker_command,
)
from mesh.sidecar.liveness import HUNG_EXIT_STATUS
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.directory import read_live
from registry.schema import Indices

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("worker", "asked", "unit"),
    [
        (0, True, 0),
        (3, False, 3),
        (-signal.SIGTERM, True, 0),  # stopped as asked
        (-signal.SIGTERM, False, 128 + signal.SIGTERM),  # someone else stopped it
        (-signal.SIGKILL, False, 128 + signal.SIGKILL),
        (-signal.SIGKILL, True, 128 + signal.SIGKILL),  # ignored SIGTERM, then killed
    ],
)
def test_the_units_status_reads_as_a_shells(worker: int, asked: bool, unit: int) -> None:
    assert unit_status(worker, asked=asked) == unit


def test_ready_line_and_default_command(tmp_path: Path) -> None:
    assert parse_ready("w1 listening on 127.0.0.1:5000 pid 3") == "127.0.0.1:5000"
    assert parse_ready("loading weights") is None
    private = PrivateSocket(Path("/p"), "w.sock")
    unix = door("unix", private)
    assert worker_command("data", None, ["--root", "x"], unix)[-6:] == [
        "worker",
        "data",
        "--listen",
        "unix:/p/w.sock",
        "--root",
        "x",
    ]
    # A custom command is left as written: it finds the address in $MESHSERVE_WORKER_LISTEN.
    assert unix.env == {LISTEN_ENV: "unix:/p/w.sock", FOLDER_ENV: "/p"} and unix.secret is None
    assert worker_command("data", "python -m w 'a b'", ["-v"], unix) == [
        "python",
        "-m",
        "w",
        "a b",
        "-v",
    ]
    # TCP: a free loopback port, and a fresh secret in the private folder for both sides.
    tcp = door("tcp", PrivateSocket(tmp_path, "w.sock"))
    secret_file = tmp_path / "sidecar-secret"
    assert tcp.flags == ("--port", "0", "--sidecar-secret-file", str(secret_file))
    assert tcp.env == {SECRET_FILE_ENV: str(secret_file), FOLDER_ENV: str(tmp_path)}
    assert tcp.secret == read_secret(secret_file)


@dataclass
class Launched:
    process: subprocess.Popen[str]
    sidecar: str
    worker: str
    worker_pid: int


def _launch(store_url: str, indices: Indices, *extra: str) -> subprocess.Popen[str]:
    """``meshserve run inference`` with a fake worker (tests.mesh.sidecar.worker_proc)."""
    command = f"{shlex.quote(sys.executable)} -m tests.mesh.sidecar.worker_proc w9"
    return subprocess.Popen(
        [
            sys.executable, "-m", "cli.main", "run", "inference",
            f"--worker-command={command}", "--mtls=DISABLE", "--drain-delay=0.5",
            f"--es={store_url}", f"--prefix={indices.prefix}", *extra,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


def _started(process: subprocess.Popen[str]) -> Launched:
    """The launched unit once both its ready lines are out."""
    assert process.stdout is not None
    worker_line = process.stdout.readline()
    assert worker_line.startswith("w9 listening on "), worker_line
    sidecar_line = process.stdout.readline()
    assert sidecar_line.startswith("sidecar listening on "), sidecar_line
    return Launched(
        process, sidecar_line.split()[3], worker_line.split()[3], int(worker_line.split()[-1])
    )


@pytest.fixture
def launched(store_url: str, indices: Indices) -> Iterator[Launched]:
    """``meshserve run inference`` with a fake worker, both listening."""
    process = _launch(store_url, indices)
    try:
        yield _started(process)
    finally:
        _end(process)


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
    launched: Launched, es: AsyncElasticsearch, indices: Indices
) -> None:
    process, address, worker_pid = launched.process, launched.sidecar, launched.worker_pid

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
    launched: Launched, es: AsyncElasticsearch, indices: Indices
) -> None:
    process, worker_pid = launched.process, launched.worker_pid
    os.kill(worker_pid, signal.SIGKILL)
    await _until(lambda: process.poll() is not None, "the launcher exits")
    # As a shell reports it, so the supervisor says "exited with status 137 (SIGKILL)".
    assert process.returncode == 128 + signal.SIGKILL

    async def deregistered() -> bool:
        live = await read_live(es, indices, datetime.now(UTC), service="inference")
        return not live.instances

    await _until(deregistered, "the instance is deregistered")


@pytest.mark.e2e
async def test_a_worker_silent_for_the_liveness_window_is_killed_and_the_unit_exits(
    store_url: str, indices: Indices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP: the worker's connection stays open, only its health checks go unanswered.
    After the window (set through the environment, as ``up`` passes it) the unit kills its
    worker and exits with a status that says so, to be restarted as after a crash."""
    monkeypatch.setenv(LIVENESS_ENV, "2")
    process = _launch(store_url, indices)
    stopped: list[int] = []
    try:
        unit = _started(process)
        async with grpc.aio.insecure_channel(unit.sidecar) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                pb.ModelInferRequest(model_name="m"), timeout=10
            )
        assert reply.id == "w9"
        os.kill(unit.worker_pid, signal.SIGSTOP)
        stopped.append(unit.worker_pid)
        await _until(lambda: process.poll() is not None, "the unit gives up on its worker")
        assert process.returncode == HUNG_EXIT_STATUS
        assert not _alive(unit.worker_pid)
    finally:
        for pid in stopped:  # should the unit not have killed it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _end(process)


def test_the_liveness_window_defaults_to_kubernetes_and_refuses_a_negative(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(LIVENESS_ENV, raising=False)
    assert build_parser().parse_args(["run", "data"]).liveness_window == 30.0
    assert build_parser().parse_args(["run", "data", "--liveness-window=0"]).liveness_window == 0
    monkeypatch.setenv(LIVENESS_ENV, "4")
    assert build_parser().parse_args(["run", "data"]).liveness_window == 4.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "data", "--liveness-window=-1"])
    assert "must be >= 0 seconds" in capsys.readouterr().err


@pytest.mark.e2e
async def test_a_killed_run_takes_its_worker_down(launched: Launched) -> None:
    """SIGKILL: no drain, no ``finally``; the kernel breaks the lifeline (and PDEATHSIG)."""
    folder = Path(launched.worker.removeprefix("unix:")).parent
    assert folder.is_dir()
    try:
        launched.process.kill()
        launched.process.wait(30)
        await _until(lambda: not _alive(launched.worker_pid), "the orphaned worker exits")
        # The worker outlived its parent, so it removed the private folder on its way out.
        assert not folder.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: Connects to a Unix socket, as uid 65534 when told to: prints "connected" or raises.
_PROBE = """
import os, socket, sys
if sys.argv[2] == "nobody":
    os.setuid(65534)
with socket.socket(socket.AF_UNIX) as s:
    s.connect(sys.argv[1])
print("connected")
"""


def _connect(path: Path, as_user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), as_user],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.e2e
async def test_the_worker_is_reachable_through_its_sidecar_only(launched: Launched) -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "needs root to connect as another uid (65534); as one user the private folder "
            "cannot be tested: its owner may always enter it"
        )
    assert launched.worker.startswith("unix:"), launched.worker
    socket_path = Path(launched.worker.removeprefix("unix:"))
    folder = socket_path.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # Another local user is refused at the folder; the same probe as the owner connects.
    refused = _connect(socket_path, "nobody")
    assert refused.returncode != 0 and "PermissionError" in refused.stderr, refused
    assert _connect(socket_path, "owner").stdout.strip() == "connected"
    # The same call through the sidecar works.
    async with grpc.aio.insecure_channel(launched.sidecar) as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name="m"), timeout=10
        )
    assert reply.id == "w9"
    launched.process.send_signal(signal.SIGTERM)
    await _until(lambda: launched.process.poll() is not None, "the launcher exits")
    assert not folder.exists()


@pytest.mark.e2e
async def test_a_sidecar_that_fails_to_start_leaves_no_worker(
    store_url: str, indices: Indices
) -> None:
    # A plaintext port is PERMISSIVE's: with mTLS disabled the sidecar refuses to start.
    process = _launch(store_url, indices, "--plaintext-port=0")
    try:
        assert process.stdout is not None
        worker_line = process.stdout.readline()
        assert worker_line.startswith("w9 listening on "), worker_line
        assert process.wait(60) == 1
        assert not _alive(int(worker_line.split()[-1]))
        assert not Path(worker_line.split()[3].removeprefix("unix:")).parent.exists()
    finally:
        _end(process)


#: A worker that never announces an address: ``run`` stays in its start-up.
_NEVER_READY = "import os, time; print('starting pid', os.getpid(), flush=True); time.sleep(600)"


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_during_start_up_stops_the_worker(
    sig: signal.Signals, store_url: str, indices: Indices
) -> None:
    command = shlex.join([sys.executable, "-c", _NEVER_READY])
    process = subprocess.Popen(
        [
            sys.executable, "-m", "cli.main", "run", "data", f"--worker-command={command}",
            "--mtls=DISABLE", f"--es={store_url}", f"--prefix={indices.prefix}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # relayed by run: the worker has started
        assert line.startswith("starting pid "), line
        worker_pid = int(line.split()[-1])
        process.send_signal(sig)
        assert process.wait(60) == 128 + sig
        await _until(lambda: not _alive(worker_pid), "the worker is stopped")
    finally:
        _end(process)


@pytest.mark.e2e
async def test_tcp_mode_refuses_a_call_without_the_sidecars_secret(
    store_url: str, indices: Indices
) -> None:
    process = _launch(store_url, indices, "--worker-listen=tcp")
    try:
        unit = _started(process)
        assert unit.worker.startswith("127.0.0.1:"), unit.worker
        request = pb.ModelInferRequest(model_name="m")
        async with grpc.aio.insecure_channel(unit.worker) as direct:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.GRPCInferenceServiceStub(direct).ModelInfer(request, timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as guessed:
                await pb_grpc.GRPCInferenceServiceStub(direct).ModelInfer(
                    request, metadata=((HEADER, "a guess of the right length.."),), timeout=10
                )
            assert guessed.value.code() is grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(unit.sidecar) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert reply.id == "w9"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert not _alive(unit.worker_pid)
    finally:
        _end(process)
