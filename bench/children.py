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


@contextmanager
def child(*args: str, stop_timeout: float = 10, repo: Path = REPO) -> Iterator[Child]:
    """Runs ``python -m ARGS``; yields its address, from its first line ("... listening
    on ADDRESS ..."), and pid; terminates it on exit (killed after ``stop_timeout`` s).

    ``repo``: the checkout it runs from (another one: an older revision to compare with).
    """
    env = ENV
    if repo != REPO:
        env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), ENV["PYTHONPATH"]]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=repo, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"{args} did not start (exit {proc.poll()}): {line!r}")
        yield Child(line.split("listening on ")[1].split()[0], proc.pid)
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
def process(*args: str, stop_timeout: float = 10) -> Iterator[str]:
    """:func:`child` from this checkout, yielding only the address."""
    with child(*args, stop_timeout=stop_timeout) as started:
        yield started.address
