"""Benchmark child processes: started from this checkout, stopped however they end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The children import this checkout first, and whatever the caller's PYTHONPATH adds
#: (packages carried to a GPU machine, say).
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


@dataclass(frozen=True)
class Child:
    """A started child: the address it listens on and its process id."""

    address: str
    pid: int


#: The process id behind each address :func:`child` yielded, by the address's port (for
#: CPU accounting: callers may rewrite the host, as bench.sidecar does for TLS names).
PIDS: dict[str, int] = {}


@contextmanager
def child(
    *args: str,
    stop_timeout: float = 10,
    repo: Path = REPO,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Child]:
    """Runs ``python -m ARGS``; yields its address, from its first line ("... listening
    on ADDRESS ..."), and pid; terminates it on exit (killed after ``stop_timeout`` s).

    ``repo``: the checkout it runs from (another one: an older revision to compare with).
    ``extra_env``: added to its environment.
    """
    env = ENV
    if repo != REPO:
        env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), ENV["PYTHONPATH"]]))}
    if extra_env:
        env = {**env, **extra_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=repo, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"{args} did not start (exit {proc.poll()}): {line!r}")
        started = Child(line.split("listening on ")[1].split()[0], proc.pid)
        PIDS[started.address.rsplit(":", 1)[-1]] = proc.pid
        yield started
    finally:
        proc.terminate()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def process(
    *args: str,
    stop_timeout: float = 10,
    env: dict[str, str] | None = None,
    checkout: Path = REPO,
) -> Iterator[str]:
    """:func:`child` (from ``checkout``, with ``env`` added), yielding only the address."""
    with child(*args, stop_timeout=stop_timeout, repo=checkout, extra_env=env) as started:
        yield started.address


def pid_of(address: str) -> int:
    """The process :func:`child` started that serves ``address``."""
    return PIDS[address.rsplit(":", 1)[-1]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
