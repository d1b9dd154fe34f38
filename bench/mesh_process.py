"""A `meshserve up` (or `meshserve hosts up`) subprocess for the benchmarks: its log,
its up.json, waiting on it, and stopping it as a terminal's Ctrl-C would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.children import ENV, REPO


class MeshProcess:
    def __init__(
        self,
        command: Sequence[str],
        state: Path,
        log: Path,
        *,
        label: str = "up",
        stop_timeout: float = 60.0,
    ) -> None:
        self.label = label
        self.state = state
        self.log = log
        self._stop_timeout = stop_timeout
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *command, "--state-dir", str(state)],
                cwd=REPO,
                env={**ENV, "COLUMNS": "200"},
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def up(self) -> dict[str, Any]:
        endpoints: dict[str, Any] = json.loads((self.state / "up.json").read_text())
        return endpoints

    def units(self) -> dict[str, dict[str, Any]]:
        return {u["slug"]: u for u in self.up()["units"]}

    @property
    def gateway(self) -> str:
        return str(self.up()["gateway"])

    def wait(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        """Polls ``check`` until it holds; fails at once if the mesh exits."""
        deadline = time.monotonic() + timeout
        while not check():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: timed out waiting for {what}")
            time.sleep(0.5)

    def wait_ready(self, timeout: float) -> None:
        """Until up.json is written (every unit started)."""
        self.wait("up.json", self._started, timeout)

    def _started(self) -> bool:
        try:
            self.up()
        except (OSError, ValueError):
            return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
