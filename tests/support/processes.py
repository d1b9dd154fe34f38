"""Starts meshserve processes for multi-process tests and makes sure none outlives the test.

Each process runs in its own session (so it leads a process group that holds whatever it
starts: ``meshserve run`` starts a worker), its stdout is read by a thread (a full pipe
would block it) and kept for lookups and failure messages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
READY = "listening on "


class Launched:
    """One process group started with ``python -m ARGS``; its stdout lines are collected."""

    def __init__(self, *args: str, name: str = "") -> None:
        self.name = name or args[0]
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> str:
        """The first output line matching ``predicate``; fails naming the output otherwise."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                exited = self.process.poll() is not None and not self._reader.is_alive()
                if left <= 0 or exited:
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(
                        f"{self.name}: no matching line ({'exited' if exited else 'timed out'}):\n{tail}"
                    )
                self._changed.wait(min(left, 0.5))

    def address(self, prefix: str = "", timeout: float = 60.0) -> str:
        """The address in the first ``PREFIX... listening on ADDRESS`` line."""
        line = self.wait_for(lambda text: text.startswith(prefix) and READY in text, timeout)
        return line.split(READY, 1)[1].split()[0]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signals the whole group (the process and what it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``grace``, reap the leader."""
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        # Whatever the leader left behind goes too.
        self.kill(signal.SIGKILL)
        self.process.wait(grace)
        self._reader.join(grace)
        if self.process.stdout is not None:
            self.process.stdout.close()


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields after the command name) of every process (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        yield int(entry.name), stat.rsplit(")", 1)[1].split()


def group_members(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes in any of the process groups ``pgids`` (Linux /proc)."""
    return [pid for pid, f in process_stats() if int(f[2]) in pgids and f[0] != "Z"]


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``meshserve ARGS`` run to completion (wide terminal: tables stay on one line)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env={**ENV, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
