"""Entry point of the ``meshserve`` command: builds the parser from command modules."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from mesh.cli_error import CliError

if TYPE_CHECKING:
    from rich.console import Console

# grpc, rich and the mesh core are imported where they are used, not here: `meshserve
# --help` should cost the interpreter's start and argparse, nothing more (a command's own
# module imports what it needs; tests/cli/test_main.py checks what --help imports).

#: Every top-level command: the module whose ``register(subparsers)`` adds it, and the help
#: line ``meshserve --help`` shows without importing that module (torch and the store client
#: take seconds to import). tests/cli/test_main.py checks both against the modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("cli.up", "run the whole mesh locally until Ctrl-C"),
    "hosts": (
        "cli.hosts",
        "the mesh across four hosts made on this machine (network namespaces; root)",
    ),
    "restart": (
        "cli.restart",
        "rolling restart of one unit of `meshserve up` (drain, then start again)",
    ),
    "autoscale": (
        "cli.autoscale",
        "scale a Kubernetes Deployment of workers with their live load",
    ),
    "train": ("cli.train", "train the next version of a model (live progress)"),
    "infer": ("cli.infer", "run one inference request through the gateway"),
    "call": ("cli.call", "call any gRPC method by reflection (like grpcurl)"),
    "apply": (
        "cli.apply",
        "apply routing YAML to the running gateway (like kubectl apply -f)",
    ),
    "bench": (
        "cli.bench",
        "a short inference load through the gateway: latency and throughput",
    ),
    "trace": ("cli.trace", "show a request's spans (gateway → sidecar → worker) as a tree"),
    "datasets": ("cli.datasets", "manage the datasets of a data worker"),
    "status": ("cli.registry", "services, instances, health, lease age, loaded versions and load"),
    "models": ("cli.registry", "the model catalog: list, promote, rollback"),
    "registry": ("cli.registry", "the discovery store itself"),
    "gateway": ("gateway.cli", "run the gateway: routes gRPC calls to workers by Istio-style YAML"),
    "route": ("cli.route", "inspect routing decisions"),
    "config": ("cli.route", "show or change the gateway's routing config"),
    "certs": ("mesh.security.cli", "the mesh CA and workload certificates"),
    "auth": ("gateway.auth_cli", "gateway client credentials"),
    "sidecar": (
        "mesh.sidecar.cli",
        "run a worker's sidecar: registration, mTLS, authorization, outbound routing",
    ),
    "run": ("mesh.sidecar.launcher", "run a worker and its sidecar as one unit"),
}
#: ``meshserve worker <kind>`` commands, the same way.
WORKERS: dict[str, tuple[str, str]] = {
    "data": ("workers.data.cli", "run a data worker (stores datasets, streams batches)"),
    "inference": (
        "workers.inference.cli",
        "serve models over the Open Inference Protocol (Triton/KServe v2 gRPC)",
    ),
    "training": (
        "workers.training.cli",
        "train catalogue models on data-service datasets and publish versions",
    ),
}

__all__ = ["CliError", "build_parser", "main"]


class _Registrar(Protocol):
    def __call__(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


Handler = Callable[[argparse.Namespace], int]


def _registrar(module: str) -> _Registrar:
    register: _Registrar = importlib.import_module(module).register
    return register


def _positionals(argv: Sequence[str]) -> list[str]:
    """The words of ``argv`` that are not options (enough to find a command's name)."""
    return [word for word in argv if not word.startswith("-")]


def _wanted(argv: Sequence[str] | None) -> tuple[set[str] | None, set[str] | None]:
    """The command modules and worker modules to import for ``argv``; None: all of them.

    Nothing for ``meshserve --help``; the command's own module for a command; everything
    for a word the tables do not know (a command added without its line: slow, not broken).
    """
    if argv is None:
        return None, None
    words = _positionals(argv)
    if not words:
        return set(), set()
    if words[0] == "worker":
        if len(words) < 2:
            return set(), set()
        kind = WORKERS.get(words[1])
        return set(), ({kind[0]} if kind is not None else None)
    command = COMMANDS.get(words[0])
    if command is None:
        return None, None
    return {command[0]}, set()


def _add_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    table: dict[str, tuple[str, str]],
    wanted: set[str] | None,
) -> None:
    """Registers the wanted modules' commands; the others only as a name and a help line."""
    registered: set[str] = set()
    for name, (module, help_line) in table.items():
        if wanted is None or module in wanted:
            if module not in registered:
                _registrar(module)(subparsers)
                registered.add(module)
        else:
            subparsers.add_parser(name, help=help_line)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``meshserve`` parser; given ``argv``, complete only for the command it names."""
    wanted_commands, wanted_workers = _wanted(argv)
    parser = argparse.ArgumentParser(
        prog="meshserve", description="A gRPC service mesh for serving and training PyTorch models."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = sub.add_parser("worker", help="run one worker process")
    worker_sub = worker.add_subparsers(dest="worker", required=True, metavar="KIND")
    _add_commands(worker_sub, WORKERS, wanted_workers)
    _add_commands(sub, COMMANDS, wanted_commands)
    return parser


def _stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def setup_logging(verbosity: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=_stderr(), show_path=False, rich_tracebacks=False)],
    )
    if verbosity == 0:
        # Its per-node warnings repeat what the command's own one-line error says.
        logging.getLogger("elastic_transport").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "worker":
        from mesh.server import lifeline

        # Started by `meshserve run`: exit when it does, however it ends, and leave no
        # socket folder behind if it went first.
        lifeline.watch_from_env()
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        line = one_line_error(exc)
        if line is None:
            raise
        from rich.markup import escape

        # soft_wrap: one line however narrow the terminal, so scripts can grep it.
        _stderr().print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        return 1


#: The most of an error line printed: a config error quotes the value it refuses, which
#: may be a whole 4 MB file.
MAX_ERROR_LINE = 2000


def one_line_error(exc: BaseException) -> str | None:
    """What ``meshserve`` prints for an error a command may raise (cut to MAX_ERROR_LINE);
    None for anything else (a bug: its traceback is worth more than a line).

    Mesh errors and gRPC errors are named like a gRPC status: the same failure reads the
    same from any command. Their modules are looked at only if a command imported them
    (an exception of a class never imported cannot have been raised).
    """
    line = _error_text(exc)
    if line is not None and "\n" in line:
        # One line, as scripts grep it (protobuf's JSON errors carry a second line).
        line = " ".join(part.strip() for part in line.splitlines() if part.strip())
    if line is not None and len(line) > MAX_ERROR_LINE:
        line = f"{line[:MAX_ERROR_LINE]}... ({len(line) - MAX_ERROR_LINE} characters cut)"
    return line


def _error_text(exc: BaseException) -> str | None:
    if "mesh.errors" in sys.modules:
        from mesh.errors import MeshError

        if isinstance(exc, MeshError):
            return f"{exc.code.name}: {exc}"
    if isinstance(exc, CliError | ValueError | OSError):
        return str(exc)
    if "grpc" in sys.modules:
        import grpc

        if isinstance(exc, grpc.RpcError):
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return f"{code.name if code is not None else 'UNKNOWN'}: {details}"
    return None


if __name__ == "__main__":
    sys.exit(main())
