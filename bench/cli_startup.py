"""CLI start-up: wall time of ``meshserve …`` commands, lazy command imports vs all of them.

Run: ``.venv/bin/python -m bench.cli_startup [--runs 10] [--state-dir .meshserve]``

Each row runs a command as its own process, ``--runs`` times, interleaved with the
reference, and prints the median and the fastest wall time. The reference is what every
command cost before the imports were lazy: building the complete parser, which imports
every command module (torch, the store client, grpc, the gateway), then the same command.

With a ``meshserve up`` running under ``--state-dir``, the table also times the commands
themselves, end to end against it: ``status`` (reads the store) and ``infer`` (one request
through the gateway) — the issue's targets are --help under 0.3 s, those under 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
#: The old entry point: every module imported up front, then the command parsed and run.
EAGER = "import sys; from cli import main as m; m.build_parser(); sys.exit(m.main(sys.argv[1:]))"
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("status", "--help"),
    ("infer", "--help"),
    ("worker", "inference", "--help"),
)
#: Run against a running `up` (its state folder): the commands themselves.
AGAINST_UP: tuple[tuple[str, ...], ...] = (
    ("status",),
    ("infer", "demo", "-d", "[[0.5, -1.0, 2.0, 0.1]]"),
)


def wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the state folder of a running `meshserve up`: time status and infer against it",
    )
    args = parser.parse_args()
    table = Table(title=f"meshserve start-up, {args.runs} runs each (seconds)")
    for column in ("command", "lazy median", "lazy min", "eager median", "eager min"):
        table.add_column(column, justify="left" if column == "command" else "right")
    commands = list(COMMANDS)
    env = dict(ENV)
    if args.state_dir is not None:
        if not (args.state_dir / "up.json").exists():
            parser.error(f"no meshserve up runs under {args.state_dir} (no up.json)")
        commands.extend(AGAINST_UP)
        env["MESHSERVE_STATE_DIR"] = str(args.state_dir.resolve())
    for command in commands:
        lazy: list[float] = []
        eager: list[float] = []
        for _ in range(args.runs):
            lazy.append(wall([sys.executable, "-m", "cli.main", *command], env))
            eager.append(wall([sys.executable, "-c", EAGER, *command], env))
        table.add_row(
            "meshserve " + " ".join(command),
            f"{statistics.median(lazy):.2f}",
            f"{min(lazy):.2f}",
            f"{statistics.median(eager):.2f}",
            f"{min(eager):.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
