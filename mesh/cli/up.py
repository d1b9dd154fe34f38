"""``meshserve up``: runs the local mesh (so far, a data worker) until Ctrl-C or SIGTERM.

Each component is a child process started in order and stopped in reverse
order, so later components (registry, gateway, inference and training workers)
join by adding one entry to :func:`components`.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from mesh.cli.errors import CliError
from workers.data.server import READY_PREFIX as DATA_READY

out = Console()

#: How long a component may take to print its ready line.
START_TIMEOUT_S = 60.0
#: How long a component may take to drain after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Component:
    """A process of the mesh: its ``meshserve`` arguments and the line it prints when ready.

    The ready line is ``<ready_prefix><host:port>``: the process reports the
    address it bound, which matters when it was asked for port 0.
    """

    name: str
    argv: tuple[str, ...]
    ready_prefix: str


@dataclass
class Running:
    component: Component
    process: subprocess.Popen[str]
    address: str


def components(args: argparse.Namespace) -> list[Component]:
    """What ``up`` starts, in start order."""
    state = Path(args.state_dir)
    return [
        Component(
            name="data worker",
            argv=(
                "worker",
                "data",
                "--host",
                args.host,
                "--port",
                str(args.data_port),
                "--root",
                str((state / "data").resolve()),
            ),
            ready_prefix=DATA_READY,
        ),
    ]


def _pump(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Hands the child's stdout lines to ``lines`` (None at end of file)."""
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


def start(component: Component, verbose: int) -> Running:
    """Starts one component and waits for its ready line."""
    argv = [sys.executable, "-m", "mesh.cli.main", *(["-" + "v" * verbose] if verbose else [])]
    process = subprocess.Popen(
        [*argv, *component.argv],
        stdout=subprocess.PIPE,
        text=True,
        # Its own session: a terminal's Ctrl-C reaches only `up`, which then
        # stops the components in reverse order.
        start_new_session=True,
        env=os.environ.copy(),
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process, lines), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            stop(Running(component, process, ""))
            raise CliError(
                f"{component.name} did not start within {START_TIMEOUT_S:.0f} s"
            ) from None
        if line is None:
            code = process.wait()
            raise CliError(f"{component.name} exited with status {code} before it was ready")
        if line.startswith(component.ready_prefix):
            address = line[len(component.ready_prefix) :].strip()
            threading.Thread(target=_forward, args=(lines,), daemon=True).start()
            return Running(component, process, address)
        sys.stdout.write(line)


def _forward(lines: queue.Queue[str | None]) -> None:
    while (line := lines.get()) is not None:
        sys.stdout.write(line)
        sys.stdout.flush()


def stop(running: Running) -> int:
    """SIGTERM (drain), then SIGKILL if it takes too long; returns the exit status."""
    process = running.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _print_ready(started: Sequence[Running], state_dir: str) -> None:
    table = Table(title="meshserve is up", show_header=True, header_style="bold")
    table.add_column("component")
    table.add_column("address")
    table.add_column("pid", justify="right")
    for running in started:
        table.add_row(running.component.name, running.address, str(running.process.pid))
    out.print(table)
    data = started[0].address
    out.print(f"state: [bold]{Path(state_dir).resolve()}[/]\n")
    out.print("[bold]Try, from another terminal:[/]")
    for command in (
        f"grpcurl -plaintext {data} list",
        f"grpcurl -plaintext {data} describe meshserve.data.v1.DataService",
        f"meshserve datasets create blobs --source blobs --num-examples 1000 --address {data}",
        f"meshserve datasets list --address {data}",
        f"meshserve datasets stream blobs --split train --batch-size 64 --address {data}",
    ):
        out.print(f"  {command}", highlight=False, soft_wrap=True)
    out.print("\n[bold]From Python, with the generated stubs:[/]")
    snippet = (
        "  import grpc\n"
        "  from protos.meshserve.data.v1 import data_pb2 as pb, data_pb2_grpc\n"
        "  from workers.data.wire import arrays_from_batch\n"
        f"  stub = data_pb2_grpc.DataServiceStub(grpc.insecure_channel('{data}'))\n"
        "  request = pb.StreamBatchesRequest(dataset='blobs', split=pb.SPLIT_TRAIN, batch_size=64)\n"
        "  for batch in stub.StreamBatches(request):\n"
        "      print(batch.index, {k: a.shape for k, a in arrays_from_batch(batch).items()})"
    )
    out.print(snippet, highlight=False, soft_wrap=True)
    out.print("\nCtrl-C stops everything.", highlight=False)


def run(args: argparse.Namespace) -> int:
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    started: list[Running] = []
    status = 0
    try:
        for component in components(args):
            if stopping.is_set():
                break
            started.append(start(component, args.verbose))
        if not stopping.is_set():
            _print_ready(started, args.state_dir)
            sys.stdout.flush()
        while not stopping.wait(0.5):
            dead = [r for r in started if r.process.poll() is not None]
            if dead:
                out.print(
                    f"[bold red]{dead[0].component.name} exited with status "
                    f"{dead[0].process.returncode}; stopping[/]"
                )
                status = 1
                break
    finally:
        for running in reversed(started):
            code = stop(running)
            if code != 0:
                out.print(f"{running.component.name} stopped with status {code}", highlight=False)
                status = status or 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.print("meshserve stopped", highlight=False)
    return status


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the local mesh until Ctrl-C",
        description="Runs the local mesh (so far, a data worker) until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the components bind")
    parser.add_argument(
        "--data-port", type=int, default=50051, help="data worker port (0: any free port)"
    )
    parser.add_argument(
        "--state-dir", default=".meshserve", help="where datasets and other state live"
    )
    parser.set_defaults(handler=run)
