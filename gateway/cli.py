"""``meshserve gateway``: runs the ingress proxy."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc.aio

from gateway.app import Gateway
from gateway.auth import AuthConfig, ClientGuard
from gateway.discovery import StaticDiscovery, parse_static
from mesh.cli.main import CliError
from mesh.security.guard import GuardInterceptor
from mesh.server.app import ServerSettings, serve_until_signal

log = logging.getLogger(__name__)
DEFAULT_PORT = 8080


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run the gateway: routes gRPC calls to workers by Istio-style YAML",
        description="Routes every mesh gRPC call to a worker (consistent hash on model version, "
        "retries, outlier detection), configured by the YAML files in --config, which are "
        "reloaded when they change.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free port)"
    )
    parser.add_argument("--config", type=Path, help="directory (or file) of routing YAML")
    parser.add_argument(
        "--static",
        action="append",
        default=[],
        metavar="SERVICE=HOST:PORT[,LABEL=VALUE...]",
        help="a fixed endpoint instead of registry discovery (repeatable)",
    )
    parser.add_argument(
        "--auth-config",
        type=Path,
        metavar="FILE",
        help="client authentication and rate limits (YAML, see gateway/auth.py and docs/security.md)",
    )
    parser.add_argument(
        "--reload-interval", type=float, default=1.0, help="seconds between config directory checks"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        instances = [parse_static(spec) for spec in args.static]
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if not instances:
        raise CliError(
            "no endpoints: give --static SERVICE=HOST:PORT (registry discovery plugs in here)"
        )
    settings = ServerSettings(host=args.host, port=args.port)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if args.auth_config is not None:
        # Loaded before serving: a bad file is a one-line error, not a half-open gateway.
        interceptors.append(GuardInterceptor(ClientGuard(AuthConfig.load(args.auth_config))))
    asyncio.run(
        _serve(
            StaticDiscovery(instances), settings, args.config, args.reload_interval, interceptors
        )
    )
    return 0


async def _serve(
    discovery: StaticDiscovery,
    settings: ServerSettings,
    config: Path | None,
    reload_interval: float,
    interceptors: list[grpc.aio.ServerInterceptor],
) -> None:
    gateway = Gateway(
        discovery, config_dir=config, reload_interval=reload_interval, interceptors=interceptors
    )
    serving = await gateway.start(settings)
    # One parseable line on stdout: scripts and tests read the bound port from it.
    print(
        f"gateway listening on {serving.address} (config version {gateway.state.config.version})",
        flush=True,
    )
    await serve_until_signal(serving)
