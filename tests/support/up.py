"""A `meshserve up` subprocess for end-to-end tests, and the helpers around it.

Shared by tests/e2e/test_up.py (the tour, a clean stop) and tests/e2e/test_chaos.py (faults
under load): a logged ``up`` process, its up.json, the ``meshserve`` CLI, and /proc walks
that find what a test left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from registry.embedded import free_port
from registry.state_dir import UP_FILE
from tests.support.processes import process_stats

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
#: Starting the mesh and training the demo model, on a loaded 2-core machine.
READY_TIMEOUT_S = 150.0
STOP_TIMEOUT_S = 60.0


def cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
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


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    return [child for child, fields in process_stats() if int(fields[1]) == pid]


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


def naming(state: Path) -> list[int]:
    """Every process whose command line names the state folder."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and str(state).encode() in cmdline(entry)
    ]


def kill_leftovers(state: Path) -> None:
    """Whatever a failed test left behind: every process that still names the state folder."""
    for pid in naming(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Up:
    """One `meshserve up` subprocess; its output goes to a log file."""

    def __init__(
        self,
        state: Path,
        port: int,
        log: Path,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.state = state
        self.log = log
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli.main",
                    "up",
                    "--state-dir",
                    str(state),
                    "--port",
                    str(port),
                    "--demo-epochs",
                    "1",
                    *extra,
                ],
                cwd=ROOT,
                env={**ENV, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def endpoints(self) -> dict[str, Any]:
        """up.json as it is now (written atomically, so never half a file)."""
        endpoints: dict[str, Any] = json.loads((self.state / UP_FILE).read_text())
        return endpoints

    def units(self) -> dict[str, dict[str, Any]]:
        """Each unit's entry in up.json, by slug ("inference-1", "store", "gateway")."""
        return {unit["slug"]: unit for unit in self.endpoints()["units"]}

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"up exited with {self.process.returncode}:\n{self.output()}")
            try:
                return self.endpoints()
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


@contextlib.contextmanager
def running_up(base: Path, env: dict[str, str] | None = None) -> Iterator[Up]:
    """An ``up`` under ``base`` (``state/``, ``up.log``) for the block, then Ctrl-C, which
    must end it cleanly (exit 0), and whatever it left behind killed."""
    state = base / "state"
    up = Up(state, free_port(), base / "up.log", env=env)
    try:
        up.wait_ready()
        yield up
        up.interrupt()
        assert up.process.returncode == 0, up.output()[-3000:]
    finally:
        up.kill()
        kill_leftovers(state)
