"""Issue 17: the inference worker against the floor server, before and after, side by side.

Run (once ``bench/perf_venv.sh`` has built ``bench/.perf-venv``):
``.venv/bin/python -m bench.worker_floor [--before main] [--rounds 3] [--concurrency 8 32]``

Triton's perf_analyzer (``-i grpc``, count windows, as in bench.perf_analyzer) on the MLP
64→256→256→10 with dynamic batching, against four servers, one after the other:

- **floor**: bench.oip_floor, a minimal Open Inference Protocol server on the same stack
  (grpc.aio) that decodes the raw input and answers it unchanged: what the stack itself
  costs per request, with no model, batching or bookkeeping;
- **before**: ``meshserve worker inference`` from a temporary git worktree of ``--before``
  (default ``main``), the revision to compare with;
- **after**: the same from this checkout (its default stack: the hot RPCs on the HTTP/2
  front, mesh/server/h2_front.py);
- **after, grpc**: this checkout with ``--serve-with grpc`` (every RPC on grpc.aio), which
  tells the front's share of the difference from the rest of the branch's.

Each worker runs with one torch thread, as under ``meshserve up``. A shared machine
disturbs single runs, so the three run in ``--rounds`` rounds (in a rotating order) and
each cell keeps its best round; besides infer/s the table shows the server's CPU time per
request (from /proc, all its threads), which other processes on the machine disturb less
than throughput.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.children import REPO, Child, child
from bench.perf_analyzer import analyze, build_repository, tool, wait_model_ready

FLOOR = "floor (bench.oip_floor)"
BEFORE = "worker before"
AFTER = "worker after"
AFTER_GRPC = "worker after, grpc"
SERVERS = (FLOOR, BEFORE, AFTER_GRPC, AFTER)


@dataclass(frozen=True)
class Cell:
    server: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    stable: bool


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (every thread) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A temporary detached git worktree of ``revision`` (removed on exit)."""
    folder = Path(tempfile.mkdtemp(prefix="worker-before-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), revision],
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)],
            check=False,
            capture_output=True,
        )


@contextmanager
def server(name: str, models: Path, before: Path) -> Iterator[Child]:
    if name == FLOOR:
        with child("bench.oip_floor", "--port", "0") as started:
            yield started
        return
    worker = ["cli.main", "worker", "inference", "--port", "0", "--threads", "1"]
    args = [*worker, "--model-repo", str(models), "--poll-interval", "0"]
    if name == AFTER_GRPC:
        args += ["--serve-with", "grpc"]
    with child(*args, repo=before if name == BEFORE else REPO) as started:
        yield started


def measure(
    name: str, models: Path, before: Path, concurrency: Sequence[int], requests: int
) -> list[Cell]:
    cells: list[Cell] = []
    with server(name, models, before) as started:
        wait_model_ready(started.address)
        for c in concurrency:
            cpu0, t0 = cpu_seconds(started.pid), time.monotonic()
            [row] = analyze(started.address, name, [c], requests)
            cpu, elapsed = cpu_seconds(started.pid) - cpu0, time.monotonic() - t0
            # perf_analyzer's trials run back to back: the server's CPU over the whole
            # run, divided by the requests at the measured rate, is its cost per request.
            cells.append(
                Cell(
                    name,
                    c,
                    row.throughput,
                    row.p50_ms,
                    row.p99_ms,
                    cpu / elapsed / row.throughput * 1e6,
                    row.stable,
                )
            )
    return cells


def table(
    best: dict[tuple[str, int], Cell], concurrency: Sequence[int], rounds: int, delay_us: int
) -> Table:
    out = Table(
        title=(
            "perf_analyzer, gRPC, MLP 64→256→256→10, dynamic batching "
            f"(queue delay {delay_us} µs; CPU, one torch thread): best of {rounds} round(s)"
        ),
        caption=(
            "* windows stable only within 100 % (busy machine)"
            if any(not c.stable for c in best.values())
            else None
        ),
    )
    for column in (
        "server",
        "concurrency",
        "infer/s",
        "p50 ms",
        "p99 ms",
        "server CPU µs/req",
        "infer/s / floor",
        "infer/s / before",
    ):
        out.add_column(column, justify="left" if column == "server" else "right")
    for name in SERVERS:
        for c in concurrency:
            cell = best[(name, c)]
            out.add_row(
                name,
                str(c),
                f"{cell.throughput:.0f}{'' if cell.stable else '*'}",
                f"{cell.p50_ms:.2f}",
                f"{cell.p99_ms:.2f}",
                f"{cell.cpu_us:.0f}",
                f"{cell.throughput / best[(FLOOR, c)].throughput:.2f}",
                f"{cell.throughput / best[(BEFORE, c)].throughput:.2f}",
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git revision of the 'before' worker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per count window (perf_analyzer)"
    )
    parser.add_argument(
        "--queue-delay-us",
        type=int,
        default=500,
        help="the MLP's dynamic_batching max_queue_delay_microseconds (Triton's default: 0)",
    )
    args = parser.parse_args(argv)
    tool()  # fail before starting anything
    best: dict[tuple[str, int], Cell] = {}
    order = list(SERVERS)
    with tempfile.TemporaryDirectory(prefix="perf-repo-") as tmp, checkout(args.before) as before:
        models = Path(tmp)
        build_repository(models, args.queue_delay_us)
        for round_ in range(args.rounds):
            # Rotating the order spreads slow phases of a busy machine over all of them.
            shift = round_ % len(order)
            for name in order[shift:] + order[:shift]:
                for cell in measure(name, models, before, args.concurrency, args.requests):
                    print(
                        f"round {round_ + 1}: {name:24} c={cell.concurrency:<3} "
                        f"{cell.throughput:7.0f} infer/s  {cell.cpu_us:5.0f} µs CPU/req",
                        flush=True,
                    )
                    key = (name, cell.concurrency)
                    if key not in best or cell.throughput > best[key].throughput:
                        best[key] = cell
    Console(width=160).print(table(best, args.concurrency, args.rounds, args.queue_delay_us))
    return 0


if __name__ == "__main__":
    sys.exit(main())
