"""A worker's listening flags: ``--listen unix:PATH``, or ``--host/--port`` with a sidecar secret."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mesh.cli_args import port_number
from mesh.server.app import ServerSettings
from mesh.server.sidecar_secret import read_secret


def add_listen_arguments(parser: argparse.ArgumentParser, *, default_port: int | None) -> None:
    """``--host``, ``--port`` (required when ``default_port`` is None, unless ``--listen``),
    ``--listen``, ``--sidecar-secret-file`` and ``--health-port``."""
    parser.add_argument(
        "--listen",
        metavar="unix:PATH",
        help="listen on this Unix socket instead of --host/--port (what `meshserve run` does: "
        "the socket sits in a folder only the worker's user can enter)",
    )
    port_help = "TCP port to listen on (0: any free)"
    parser.add_argument(
        "--port",
        type=port_number,
        default=default_port,
        help=port_help if default_port is None else f"{port_help}; default {default_port}",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--sidecar-secret-file",
        type=Path,
        metavar="PATH",
        help="serve only calls that carry the secret in this file (the sidecar's "
        "--app-secret-file): how a worker on a TCP port refuses local callers that bypass "
        "its sidecar",
    )
    parser.add_argument(
        "--health-port",
        type=port_number,
        metavar="PORT",
        help="also answer gRPC health, and nothing else, in plaintext on this port of every "
        "interface: for the kubelet's livenessProbe (grpc, service meshserve.liveness: "
        "SERVING while the worker answers at all, loading models or not)",
    )


def server_settings(args: argparse.Namespace, **fields: Any) -> ServerSettings:
    """The ``ServerSettings`` those flags describe (``fields``: the worker's other settings)."""
    secret = read_secret(args.sidecar_secret_file) if args.sidecar_secret_file else None
    if args.listen is not None:
        if not args.listen.startswith("unix:") or len(args.listen) <= len("unix:"):
            raise ValueError(f"--listen takes unix:PATH, got {args.listen!r}")
        return ServerSettings(
            host=args.listen, sidecar_secret=secret, health_port=args.health_port, **fields
        )
    if args.port is None:
        raise ValueError("give --port (0: any free port) or --listen unix:PATH")
    return ServerSettings(
        host=args.host,
        port=args.port,
        sidecar_secret=secret,
        health_port=args.health_port,
        **fields,
    )
