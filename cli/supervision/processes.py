"""Starting, watching and stopping ``up``'s child processes (the thin shell of the supervisor).

Each child runs in its own process group (a session), which ``up`` kills once the child has
stopped, so nothing it spawned outlives it; each also gets SIGTERM from the kernel if ``up``
itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mesh.cli_error import CliError

#: How long a component may take to print its ready line.
START_TIMEOUT_S = 90.0
#: How long a component may take to drain after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Component:
    """A process of the mesh: its ``meshserve`` arguments and how its ready line reads.

    ``ready`` returns the address in the line the process prints once it serves, or None for
    any other line: processes report the address they bound, which matters for port 0.
    The same arguments start it again after a crash, so anything others were told (the
    store's URL, the gateway's port, a training worker's outbound port) is fixed in them.
    """

    name: str
    argv: tuple[str, ...]
    ready: Callable[[str], str | None]
    #: Start order: a tier starts after the one below is ready and stops before it.
    tier: int = 0
    #: A command the process runs under, e.g. ``ip netns exec HOST`` (``meshserve hosts``:
    #: the process runs on another host's network); it must exec, keeping the pid.
    prefix: tuple[str, ...] = ()
    #: Environment variables set for this process only (e.g. its host's trace file).
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class Running:
    component: Component
    process: subprocess.Popen[str]
    address: str


def after(prefix: str) -> Callable[[str], str | None]:
    """A ``ready`` parser: the first word after ``prefix``."""

    def ready(line: str) -> str | None:
        if not line.startswith(prefix):
            return None
        rest = line[len(prefix) :].split()
        return rest[0] if rest else None

    return ready


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when ``up`` dies, however it dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the process group kill on a clean exit still applies
    # Own process group (a session): Ctrl-C at the terminal reaches only `up`, which stops
    # the components in order, and `up` can kill everything a component spawned at once.
    os.setsid()


def _pump(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Hands the child's stdout lines to ``lines`` (None at end of file)."""
    assert process.stdout is not None
    with process.stdout:
        for line in process.stdout:
            lines.put(line)
    lines.put(None)


@dataclass
class Spawned:
    """A component whose process runs but has not printed its ready line yet."""

    component: Component
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    log: Path


def spawn(component: Component, verbose: int, log: Path) -> Spawned:
    """Starts one component's process; call from the main thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the process:
    a child spawned from a short-lived helper thread would be told to stop at once.
    """
    argv = [sys.executable, "-m", "cli.main", *(["-" + "v" * verbose] if verbose else [])]
    process = subprocess.Popen(
        [*component.prefix, *argv, *component.argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent,
        env={**os.environ, **dict(component.env)},
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process, lines), daemon=True).start()
    return Spawned(component, process, lines, log)


def await_ready(spawned: Spawned, verbose: int) -> Running:
    """Waits for the ready line (any thread); the output goes to the component's log file."""
    component, process, lines = spawned.component, spawned.process, spawned.lines
    sink = spawned.log.open("a", buffering=1)
    deadline = time.monotonic() + START_TIMEOUT_S
    said = ""  # its last "error: ..." line, which names the problem
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            stop(Running(component, process, ""))
            sink.close()
            raise CliError(
                f"{component.name} did not start within {START_TIMEOUT_S:.0f} s (see {spawned.log})"
            ) from None
        if line is None:
            code = process.wait()
            kill_group(process)
            sink.close()
            reason = f": {said}" if said else ""
            raise CliError(
                f"{component.name} exited with status {code} before it was ready{reason} "
                f"(log: {spawned.log})"
            )
        if line.startswith("error:"):
            said = line.removeprefix("error:").strip()
        elif said and line.startswith(" ") and line.strip():
            said += " " + line.strip()  # rich wraps long messages
        sink.write(line)
        if verbose:
            sys.stdout.write(line)
        address = component.ready(line.strip())
        if address is not None:
            threading.Thread(target=_forward, args=(lines, sink, verbose), daemon=True).start()
            return Running(component, process, address)


def _forward(lines: queue.Queue[str | None], sink: TextIO, verbose: int) -> None:
    while (line := lines.get()) is not None:
        sink.write(line)
        if verbose:
            sys.stdout.write(line)
            sys.stdout.flush()
    sink.close()


def kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL whatever is left in the component's process group (its own children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def stop(running: Running) -> int:
    """SIGTERM (drain), then SIGKILL if it takes too long; then the group; returns the status."""
    return stop_together([running])[0]


def stop_together(group: Sequence[Running]) -> list[int]:
    """Stops independent components at once (they drain in parallel); their exit statuses."""
    for running in group:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    codes = []
    for running in group:
        process = running.process
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        kill_group(process)
        codes.append(process.returncode)
    return codes
