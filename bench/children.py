"""Benchmark child processes: started from this checkout, stopped however they end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The children import this checkout first, and whatever the caller's PYTHONPATH adds
#: (packages carried to a GPU machine, say).
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


#: The process id behind each address :func:`process` yielded, by the address's port (for
#: CPU accounting: callers may rewrite the host, as bench.sidecar does for TLS names).
PIDS: dict[str, int] = {}


@contextmanager
def process(
    *args: str,
    stop_timeout: float = 10,
    env: dict[str, str] | None = None,
    checkout: Path = REPO,
) -> Iterator[str]:
    """Runs ``python -m ARGS`` from ``checkout`` (with ``env`` added to its environment);
    yields the address from its first line ("... listening on ADDRESS ..."); terminates it
    on exit (killed after ``stop_timeout`` seconds)."""
    environment = {**ENV, **(env or {})}
    if checkout != REPO:
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(checkout), os.environ.get("PYTHONPATH")])
        )
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=checkout,
        env=environment,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"{args} did not start (exit {proc.poll()}): {line!r}")
        address = line.split("listening on ")[1].split()[0]
        PIDS[address.rsplit(":", 1)[-1]] = proc.pid
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_of(address: str) -> int:
    """The process :func:`process` started that serves ``address``."""
    return PIDS[address.rsplit(":", 1)[-1]]
