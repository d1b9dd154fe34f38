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


@contextmanager
def process(*args: str, stop_timeout: float = 10) -> Iterator[str]:
    """Runs ``python -m ARGS``; yields the address from its first line ("... listening
    on ADDRESS ..."); terminates it on exit (killed after ``stop_timeout`` seconds)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"{args} did not start (exit {proc.poll()}): {line!r}")
        yield line.split("listening on ")[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
