"""Entry point of the ``meshserve`` command: builds the parser from command modules."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from mesh.cli.errors import CliError
from mesh.errors import MeshError
from mesh.server import lifeline

#: Modules that add top-level commands: each has ``register(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "mesh.cli.up",
    "mesh.cli.train",
    "mesh.cli.infer",
    "mesh.cli.call",
    "mesh.cli.apply",
    "mesh.cli.bench",
    "mesh.cli.trace",
    "mesh.cli.datasets",
    "registry.cli",
    "gateway.cli",
    "mesh.cli.route",
    "mesh.security.cli",
    "gateway.auth_cli",
    "mesh.sidecar.cli",
    "mesh.sidecar.launcher",
)
#: Modules that add ``meshserve worker <kind>`` commands: each has ``register(subparsers)``.
WORKER_MODULES: tuple[str, ...] = (
    "workers.data.cli",
    "workers.inference.cli",
    "workers.training.cli",
)

err = Console(stderr=True)

__all__ = ["CliError", "build_parser", "main"]


class _Registrar(Protocol):
    def __call__(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


Handler = Callable[[argparse.Namespace], int]


def _registrar(module: str) -> _Registrar:
    register: _Registrar = importlib.import_module(module).register
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshserve", description="A gRPC service mesh for serving and training PyTorch models."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = sub.add_parser("worker", help="run one worker process")
    worker_sub = worker.add_subparsers(dest="worker", required=True, metavar="KIND")
    for module in WORKER_MODULES:
        _registrar(module)(worker_sub)
    for module in COMMAND_MODULES:
        _registrar(module)(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "worker":
        # Started by `meshserve run`: exit when it does, however it ends.
        lifeline.watch_from_env()
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, MeshError, ValueError, OSError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 1
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        err.print(f"[bold red]error:[/] {name}: {escape(str(details))}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
