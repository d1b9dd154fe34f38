"""`meshserve up` end to end: the whole mesh as subprocesses, the README tour, a clean stop, a restart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.cli.endpoints import UP_FILE
from registry.embedded import free_port
from tests.support.processes import process_stats

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
#: Starting the mesh and training the demo model, on a loaded 2-core machine.
READY_TIMEOUT_S = 150.0
STOP_TIMEOUT_S = 60.0

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli.main", *args],
        cwd=ROOT,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (walks /proc: parents first)."""
    children: dict[int, list[int]] = {}
    for child, fields in process_stats():
        children.setdefault(int(fields[1]), []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Up:
    """One `meshserve up` subprocess; its output goes to a log file."""

    def __init__(self, state: Path, port: int, log: Path) -> None:
        self.state = state
        self.log = log
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mesh.cli.main",
                    "up",
                    "--state-dir",
                    str(state),
                    "--port",
                    str(port),
                    "--demo-epochs",
                    "1",
                ],
                cwd=ROOT,
                env=ENV,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self) -> dict[str, object]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"up exited with {self.process.returncode}:\n{self.output()}")
            try:
                endpoints: dict[str, object] = json.loads((self.state / UP_FILE).read_text())
                return endpoints
            except (OSError, ValueError):
                time.sleep(0.2)
        pytest.fail(f"up was not ready within {READY_TIMEOUT_S:.0f} s:\n{self.output()}")

    def interrupt(self) -> set[int]:
        """SIGINT as a terminal's Ctrl-C; returns the processes it had started."""
        spawned = descendants(self.process.pid)
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=STOP_TIMEOUT_S)
        return spawned

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def mesh_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    # Whatever a failed test left behind: every process that still names the state folder.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(state).encode() in cmdline:
                with_pid = int(entry.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(with_pid, signal.SIGKILL)


def test_up_runs_the_tour_stops_cleanly_and_restarts_on_its_state(
    mesh_state: Path, tmp_path: Path
) -> None:
    port = free_port()
    up = Up(mesh_state, port, tmp_path / "up-1.log")
    try:
        endpoints = up.wait_ready()
        gateway = str(endpoints["gateway"])
        assert gateway == f"127.0.0.1:{port}"
        output = up.output()
        assert "demo version 1" in output, output  # the first up trained the demo model
        assert (mesh_state / "certs" / "ca.pem").exists()

        # The tour, through the CLI and the gateway.
        infer = cli(
            "infer", "demo", "-d", "[[0.5, -1.0, 2.0, 0.1]]", "--json", "--address", gateway
        )
        assert infer.returncode == 0, infer.stderr
        reply = json.loads(infer.stdout)
        assert reply["model_version"] == "1"
        assert len(reply["outputs"]["logits"]) == 1 and len(reply["outputs"]["logits"][0]) == 3

        bad = cli("infer", "demo", "-d", "[[1, 2]]", "--address", gateway)
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr and "Traceback" not in bad.stderr

        datasets = cli("datasets", "list", "--address", gateway)
        assert datasets.returncode == 0, datasets.stderr
        assert "demo-blobs" in datasets.stdout

        status = cli("status", "--es", str(endpoints["es_url"]))
        assert status.returncode == 0, status.stderr
        for service in ("inference", "training", "data"):
            assert service in status.stdout

        called = cli(
            "call",
            "inference.GRPCInferenceService/ModelMetadata",
            "-d",
            '{"name": "demo"}',
            "--address",
            gateway,
        )
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["inputs"][0]["name"] == "x"

        # The README's apply: the CLI sends the admin key up wrote in its state folder
        # (a dry run: the canary's version 2 does not exist in this tour).
        admin_env = {"MESHSERVE_STATE_DIR": str(mesh_state), "MESHSERVE_ADMIN_KEY": ""}
        canary = "config/examples/canary-90-10.yaml"
        dry = cli("apply", "--dry-run", "-f", canary, "--gateway", gateway, env=admin_env)
        assert dry.returncode == 0 and "routing would change" in dry.stdout, dry.stderr

        triton = subprocess.run(
            [sys.executable, "-m", "tests.e2e.triton_tour", gateway, "demo"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert triton.returncode == 0, triton.stderr
        seen = json.loads(triton.stdout)
        assert seen["live"] and seen["model_ready"]
        assert seen["version"] == "1"
        assert len(seen["output"]) == 2 and len(seen["output"][0]) == 3

        # Ctrl-C: everything stops, nothing is left.
        spawned = up.interrupt()
        assert up.process.returncode == 0, up.output()
        assert len(spawned) >= 6  # store, 4 worker units, gateway, plus their children
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in spawned if alive(pid)]
        assert not (mesh_state / UP_FILE).exists()
    finally:
        up.kill()

    # A second up finds the dataset and model it left: no new dataset, no training.
    again = Up(mesh_state, port, tmp_path / "up-2.log")
    try:
        again.wait_ready()
        output = again.output()
        assert "created dataset" not in output and "training demo" not in output, output
        assert sorted(
            p.name for p in (mesh_state / "models" / "demo").iterdir() if p.name.isdigit()
        ) == ["1"]
        infer = cli(
            "infer", "demo", "-d", "[[0.5, -1.0, 2.0, 0.1]]", "--json", "--address", gateway
        )
        assert infer.returncode == 0, infer.stderr
        assert json.loads(infer.stdout)["model_version"] == "1"
        again.interrupt()
        assert again.process.returncode == 0, again.output()
    finally:
        again.kill()


def test_up_fails_in_one_line_when_the_gateway_port_is_taken_and_leaves_nothing(
    mesh_state: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            "up",
            "--state-dir",
            str(mesh_state),
            "--port",
            str(port),
            "--no-demo",
            "--data-workers",
            "0",
            "--training-workers",
            "0",
            "--inference-workers",
            "0",
            timeout=120,
        )
    assert result.returncode == 1
    assert "gateway exited with status 1 before it was ready" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not (mesh_state / UP_FILE).exists()
    assert not [
        entry.name
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and str(mesh_state).encode() in _cmdline(entry)
    ]


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""
