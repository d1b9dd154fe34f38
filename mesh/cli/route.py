"""``meshserve route explain`` and ``meshserve config apply|dump``: the gateway's admin API."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc.aio
from rich.console import Console
from rich.table import Table

from mesh.cli.endpoints import add_state_dir_argument, gateway_from_args
from mesh.cli.main import CliError
from mesh.config.loader import parse_yaml
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc

out = Console()


def gateway_option(parser: argparse.ArgumentParser) -> None:
    """--gateway and --state-dir; the default is found when the command runs (``_gateway``)."""
    parser.add_argument(
        "--gateway",
        default=None,
        help="gateway address (default: $MESHSERVE_GATEWAY, else the running up, else 127.0.0.1:8080)",
    )
    add_state_dir_argument(parser)


def _gateway(args: argparse.Namespace) -> str:
    return gateway_from_args(args, args.gateway)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    route = subparsers.add_parser("route", help="inspect routing decisions")
    route_sub = route.add_subparsers(dest="route_command", required=True, metavar="COMMAND")
    explain = route_sub.add_parser("explain", help="which endpoint a request would reach, and why")
    gateway_option(explain)
    explain.add_argument("--model", default="", help="model_name of the request")
    explain.add_argument("--version", default="", help="model_version (empty: latest)")
    explain.add_argument("--method", default="", help="gRPC path (default: ModelInfer)")
    explain.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata (repeatable)",
    )
    explain.set_defaults(handler=explain_route)

    config = subparsers.add_parser("config", help="show or change the gateway's routing config")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    apply = config_sub.add_parser("apply", help="validate and apply YAML over the running config")
    gateway_option(apply)
    apply.add_argument("files", nargs="+", type=Path, help="YAML files")
    apply.add_argument("--dry-run", action="store_true", help="validate only")
    apply.add_argument(
        "--expected-version", type=int, default=0, help="apply only over this version"
    )
    apply.set_defaults(handler=apply_config)
    dump = config_sub.add_parser("dump", help="print the running config as YAML")
    gateway_option(dump)
    dump.set_defaults(handler=dump_config)


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--header needs KEY=VALUE, got {pair!r}")
        headers[key.lower()] = value
    return headers


async def _call(address: str, rpc: str, request: object) -> object:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        method = getattr(stub, rpc)
        return await method(request, timeout=10)


def explain_route(args: argparse.Namespace) -> int:
    request = admin_pb2.ExplainRouteRequest(
        method=args.method,
        headers=_headers(args.header),
        model_name=args.model,
        model_version=args.version,
    )
    reply = asyncio.run(_call(_gateway(args), "ExplainRoute", request))
    assert isinstance(reply, admin_pb2.ExplainRouteResponse)
    table = Table(show_header=False, box=None)
    table.add_row("route", reply.route)
    table.add_row("destination", reply.host + (f"/{reply.subset}" if reply.subset else ""))
    if reply.hash_key:
        table.add_row("hash key", f"{reply.hash_key}  ({reply.hash_source})")
    table.add_row("endpoint", reply.endpoint or "[red]none healthy[/]")
    if len(reply.candidates) > 1:
        table.add_row("retry order", " → ".join(reply.candidates[1:]))
    out.print(table)
    for number, step in enumerate(reply.steps, 1):
        out.print(f"  {number}. {step}", highlight=False)
    return 0 if reply.endpoint else 1


def apply_config(args: argparse.Namespace) -> int:
    texts = []
    for file in args.files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{file}: {exc.strerror or exc}") from exc
        # Validated here first so errors name the file; the gateway validates again,
        # against the running config (cross-references, versions).
        parse_yaml(text, str(file))
        texts.append(text)
    request = admin_pb2.ApplyConfigRequest(
        yaml="\n---\n".join(texts), expected_version=args.expected_version, dry_run=args.dry_run
    )
    reply = asyncio.run(_call(_gateway(args), "ApplyConfig", request))
    assert isinstance(reply, admin_pb2.ApplyConfigResponse)
    verb = "valid (dry run)" if args.dry_run else f"applied as version {reply.version}"
    out.print(f"{', '.join(reply.resources)}: {verb}", highlight=False)
    return 0


def dump_config(args: argparse.Namespace) -> int:
    reply = asyncio.run(_call(_gateway(args), "DumpConfig", admin_pb2.DumpConfigRequest()))
    assert isinstance(reply, admin_pb2.ConfigDump)
    print(
        f"# version {reply.version} from {reply.source}, applied {reply.applied_at.ToJsonString()}"
    )
    if reply.HasField("last_rejection"):
        print(f"# last rejected ({reply.last_rejection.source}): {reply.last_rejection.error}")
    print("---\n".join(r.yaml for r in reply.resources), end="")
    return 0
