"""``meshserve route explain`` and ``meshserve config apply|dump|rollback``: the admin API.

Every call carries the admin key (``cli.admin_credential``): ``--api-key``, else
``$MESHSERVE_ADMIN_KEY``, else the running ``up``'s ``admin.key``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TypeVar

import grpc.aio
from rich.console import Console
from rich.table import Table

from cli.admin_credential import ADMIN_KEY_ENV, admin_metadata
from cli.endpoints import gateway_from_args
from mesh.cli_error import CliError
from mesh.config.loader import Document, parse_yaml
from mesh.config.snapshot import MeshConfig
from mesh.routing.diff import diff_lines, routing_diff
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from registry.state_dir import add_state_dir_argument, state_dir_from_args

_Reply = TypeVar("_Reply")

out = Console()


def gateway_option(parser: argparse.ArgumentParser) -> None:
    """--gateway, --state-dir and --api-key; defaults are found when the command runs."""
    parser.add_argument(
        "--gateway",
        default=None,
        help="gateway address (default: $MESHSERVE_GATEWAY, else the running up, else 127.0.0.1:8080)",
    )
    add_state_dir_argument(parser)
    admin_key_option(parser)


def admin_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"an API key with the admin scope (default: ${ADMIN_KEY_ENV}, else the running "
        "up's admin.key)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    route = subparsers.add_parser("route", help="inspect routing decisions")
    route_sub = route.add_subparsers(dest="route_command", required=True, metavar="COMMAND")
    explain = route_sub.add_parser("explain", help="which endpoint a request would reach, and why")
    gateway_option(explain)
    explain.add_argument("--model", default="", help="model_name of the request")
    explain.add_argument("--version", default="", help="model_version (empty: latest)")
    explain.add_argument("--method", default="", help="gRPC path (default: ModelInfer)")
    where = explain.add_mutually_exclusive_group()
    where.add_argument(
        "--gateway-name",
        default="",
        metavar="NAME",
        help="explain with the rules bound to this Gateway ('name' or 'namespace/name'); "
        "default: the gateway's own ingress view (the Gateways that select it)",
    )
    where.add_argument(
        "--mesh",
        action="store_true",
        help="explain with the sidecars' rules (VirtualService gateways 'mesh')",
    )
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
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="validate on the gateway and print how routing would change, without applying",
    )
    apply.add_argument(
        "--expected-version", type=int, default=0, help="apply only over this version"
    )
    apply.set_defaults(handler=apply_config)
    dump = config_sub.add_parser("dump", help="print the running config as YAML")
    gateway_option(dump)
    dump.set_defaults(handler=dump_config)
    rollback = config_sub.add_parser(
        "rollback",
        help="restore the config before the running one (validated like an apply)",
        description="With the registry's config store, writes the version before the running "
        "one again as a new version (every gateway follows; a second rollback undoes the "
        "first). Without a store, restores the gateway's config before its last change.",
    )
    gateway_option(rollback)
    rollback.add_argument(
        "--dry-run", action="store_true", help="validate only: print what would be restored"
    )
    rollback.add_argument(
        "--expected-version", type=int, default=0, help="roll back only from this version"
    )
    rollback.set_defaults(handler=rollback_config)


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--header needs KEY=VALUE, got {pair!r}")
        headers[key.lower()] = value
    return headers


async def _call(args: argparse.Namespace, rpc: str, request: object) -> object:
    """One Admin call to the gateway ``args`` name, with the admin key they lead to."""
    metadata = admin_metadata(args.api_key, state_dir_from_args(args))
    async with grpc.aio.insecure_channel(gateway_from_args(args, args.gateway)) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        method = getattr(stub, rpc)
        return await method(request, timeout=10, metadata=metadata)


async def _dump_then(
    args: argparse.Namespace, rpc: str, request: object, reply_type: type[_Reply]
) -> tuple[admin_pb2.ConfigDump, _Reply]:
    """The running config, then one change to it: the dump is what the diff starts from."""
    dump = await _call(args, "DumpConfig", admin_pb2.DumpConfigRequest())
    reply = await _call(args, rpc, request)
    assert isinstance(dump, admin_pb2.ConfigDump)
    assert isinstance(reply, reply_type)
    return dump, reply


def _running(dump: admin_pb2.ConfigDump) -> MeshConfig:
    """The gateway's running config, rebuilt here from its dump (for the diff)."""
    docs = [d for r in dump.resources for d in parse_yaml(r.yaml, "gateway")]
    return MeshConfig.build(docs, version=dump.version, source=dump.source)


def _print_diff(before: MeshConfig, after: MeshConfig) -> None:
    for line in diff_lines(routing_diff(before, after)):
        out.print(f"  {line}", highlight=False)


def explain_route(args: argparse.Namespace) -> int:
    request = admin_pb2.ExplainRouteRequest(
        method=args.method,
        headers=_headers(args.header),
        model_name=args.model,
        model_version=args.version,
        view="mesh" if args.mesh else args.gateway_name,
    )
    reply = asyncio.run(_call(args, "ExplainRoute", request))
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
    incoming: list[Document] = []
    for file in args.files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise CliError(f"{file}: not UTF-8 text (byte {exc.start})") from exc
        # Validated here first so errors name the file; the gateway validates again,
        # against the running config and the mesh (cross-references, hosts, versions).
        documents = parse_yaml(text, str(file))
        if not documents:
            # As kubectl refuses "no objects passed to apply" (a file emptied by mistake).
            raise CliError(f"{file}: no resources to apply")
        incoming.extend(documents)
        texts.append(text)
    request = admin_pb2.ApplyConfigRequest(
        yaml="\n---\n".join(texts), expected_version=args.expected_version, dry_run=args.dry_run
    )
    if args.dry_run:
        dump, reply = asyncio.run(
            _dump_then(args, "ApplyConfig", request, admin_pb2.ApplyConfigResponse)
        )
        out.print(
            f"{', '.join(reply.resources)}: valid (dry run over version {dump.version}); "
            "routing would change:",
            highlight=False,
        )
        running = _running(dump)
        _print_diff(running, running.merged(incoming, version=0, source="dry run"))
        return 0
    applied = asyncio.run(_call(args, "ApplyConfig", request))
    assert isinstance(applied, admin_pb2.ApplyConfigResponse)
    out.print(
        f"{', '.join(applied.resources)}: applied as version {applied.version}", highlight=False
    )
    return 0


def rollback_config(args: argparse.Namespace) -> int:
    request = admin_pb2.RollbackConfigRequest(
        expected_version=args.expected_version, dry_run=args.dry_run
    )
    before, reply = asyncio.run(
        _dump_then(args, "RollbackConfig", request, admin_pb2.RollbackConfigResponse)
    )
    verb = "would restore" if args.dry_run else f"restored as version {reply.version}"
    out.print(f"{verb} {reply.restored}", highlight=False)
    if not args.dry_run:
        after = asyncio.run(_call(args, "DumpConfig", admin_pb2.DumpConfigRequest()))
        assert isinstance(after, admin_pb2.ConfigDump)
        _print_diff(_running(before), _running(after))
    return 0


def dump_config(args: argparse.Namespace) -> int:
    reply = asyncio.run(_call(args, "DumpConfig", admin_pb2.DumpConfigRequest()))
    assert isinstance(reply, admin_pb2.ConfigDump)
    print(
        f"# version {reply.version} from {reply.source}, applied {reply.applied_at.ToJsonString()}"
    )
    if reply.HasField("last_rejection"):
        print(f"# last rejected ({reply.last_rejection.source}): {reply.last_rejection.error}")
    print("---\n".join(r.yaml for r in reply.resources), end="")
    return 0
