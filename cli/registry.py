"""``meshserve status``, ``meshserve models ...`` and ``meshserve registry serve-store``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from cli.endpoints import gateway_from_args
from cli.supervision.report import print_units
from mesh.cli_args import port_number
from registry.catalog import ANY
from registry.connect import (
    StoreSettings,
    add_store_arguments,
    did_not_answer,
    settings_from_args,
)
from registry.directory import DEFAULT_RETENTION, read_all, sweep_dead
from registry.embedded import DEFAULT_DATA_DIR, EmbeddedStore
from registry.instances import MalformedDocument, from_document, is_live, lease_age, utc_now
from registry.locate import resolve_url
from registry.state_dir import add_state_dir_argument, state_dir_from_args
from registry.store import Store, open_store

T = TypeVar("T")

#: How long a store command may take in all (connecting, the schema, the command itself):
#: a CLI should fail fast, with the error naming the URL.
DEFAULT_DEADLINE_S = 3.0


def add_store_command_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that talks to the store and may find it through ``up``."""
    add_store_arguments(parser)
    add_state_dir_argument(parser)
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_DEADLINE_S,
        metavar="SECONDS",
        help="give up on the store after this long (default: %(default)g)",
    )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


async def run_bounded(
    settings: StoreSettings, body: Callable[[Store], Awaitable[T]], deadline_s: float
) -> T:
    """``body`` on an open store, all of it (connecting included) within ``deadline_s``.

    Every request is bounded too, so a frozen store (it accepts, never answers) fails the
    command after ``deadline_s`` with one line naming the URL.
    """
    bounded = replace(settings, request_timeout=min(settings.request_timeout, deadline_s))
    try:
        async with asyncio.timeout(deadline_s):
            async with open_store(bounded, deadline_s=deadline_s) as store:
                return await body(store)
    except TimeoutError as exc:
        raise did_not_answer(settings, deadline_s) from exc


def _run(args: argparse.Namespace, body: Callable[[Store], Awaitable[T]]) -> T:
    settings: StoreSettings = settings_from_args(args, resolve_url(args))
    return asyncio.run(run_bounded(settings, body, args.timeout))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n //= 1024
    return str(n)


def status_table(hits: list[dict[str, Any]], now: datetime) -> Table:
    """The ``meshserve status`` table from raw instance hits; pure, so it is testable."""
    table = Table(title="meshserve instances")
    for column in ("service", "instance", "address", "health", "lease age", "models", "load"):
        table.add_column(column)
    for hit in hits:
        try:
            inst = from_document(hit.get("_source") or {})
        except MalformedDocument as exc:
            table.add_row("?", str(hit.get("_id")), "-", f"[red]malformed: {exc}[/]", "-", "-", "-")
            continue
        age = lease_age(inst, now)
        if not is_live(inst, now):
            health = "[red]EXPIRED[/]"
        elif inst.status == "SERVING":
            health = "[green]SERVING[/]"
        else:
            health = f"[yellow]{inst.status}[/]"
        load = (
            f"in-flight {inst.load.in_flight}, queue {inst.load.queue_depth}, "
            f"mem {_bytes(inst.load.memory_bytes)}"
        )
        table.add_row(
            inst.service,
            inst.instance_id,
            inst.address,
            health,
            _age(age.total_seconds() if age is not None else None),
            ", ".join(str(m) for m in inst.models) or "-",
            load,
        )
    return table


def services_table(hits: list[dict[str, Any]], now: datetime) -> Table:
    """Per service: how many instances are serving, draining, not serving, or expired."""
    counts: dict[str, Counter[str]] = {}
    for hit in hits:
        try:
            inst = from_document(hit.get("_source") or {})
        except MalformedDocument:
            continue
        state = inst.status.value if is_live(inst, now) else "EXPIRED"
        counts.setdefault(inst.service, Counter())[state] += 1
    table = Table(title="meshserve services")
    for column in ("service", "serving", "draining", "not serving", "expired"):
        table.add_column(column, justify="left" if column == "service" else "right")
    for service, c in sorted(counts.items()):
        serving = f"[green]{c['SERVING']}[/]" if c["SERVING"] else "[red]0[/]"
        table.add_row(
            service, serving, str(c["DRAINING"]), str(c["NOT_SERVING"]), str(c["EXPIRED"])
        )
    return table


def cmd_status(args: argparse.Namespace) -> int:
    # The units of a running `meshserve up` first: they show even when the store is down.
    print_units(state_dir_from_args(args), Console())
    hits = _run(args, lambda store: read_all(store.es, store.indices))
    console = Console()
    if not hits:
        console.print("no instances registered")
        return 0
    now = utc_now()
    console.print(services_table(hits, now))
    console.print(status_table(hits, now))
    # What the inference fleet serves, merged by the gateway (as `models served` shows).
    from cli.served import STATUS_TIMEOUT_S, print_served

    print_served(console, gateway_from_args(args, None), min(args.timeout, STATUS_TIMEOUT_S))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    retention = timedelta(seconds=args.retention)
    deleted = _run(args, lambda store: sweep_dead(store.es, store.indices, utc_now(), retention))
    Console().print(
        f"removed {deleted} instance documents whose lease ended over {_age(args.retention)} ago"
    )
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    entries = _run(args, lambda store: store.catalog().list(args.model))
    console = Console()
    if not entries:
        console.print("no model versions published")
        return 0
    table = Table(title="model catalog")
    for column in ("model", "version", "stage", "created", "metrics", "artifact"):
        table.add_column(column)
    colors = {"production": "green", "candidate": "cyan", "archived": "dim"}
    for entry in entries:
        v = entry.version
        metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-"
        table.add_row(
            v.model,
            v.version,
            f"[{colors[entry.stage.value]}]{entry.stage.value}[/]",
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            metrics,
            v.artifact_url,
        )
    console.print(table)
    return 0


def _models_served(args: argparse.Namespace) -> int:
    from cli.served import cmd_models_served

    return cmd_models_served(args)


def cmd_models_promote(args: argparse.Namespace) -> int:
    expected = ANY if args.expect is None else (args.expect or None)
    head = _run(
        args,
        lambda store: store.catalog().promote(
            args.model, args.version, expected_production=expected
        ),
    )
    Console().print(f"{args.model}: production is now version {head.production}")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    expected = ANY if args.expect is None else (args.expect or None)
    head = _run(
        args,
        lambda store: store.catalog().rollback(args.model, expected_production=expected),
    )
    Console().print(f"{args.model}: rolled back, production is now version {head.production}")
    return 0


def cmd_serve_store(args: argparse.Namespace) -> int:
    """Runs the embedded store in the foreground until SIGTERM/SIGINT."""
    # noida goes when this process goes, even killed: a restarted store can take its port.
    store = EmbeddedStore(args.data_dir, port=args.port, host=args.host, die_with_parent=True)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True
        store.terminate()  # wait() below returns once noida has saved its data

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    store.start()
    # One line on stdout that a supervisor (`meshserve up`) can parse.
    print(f"elasticsearch {store.url} data {store.data_dir}", flush=True)
    code = store.wait()
    store.stop()  # removes the endpoint file
    return 0 if stop else (code or 1)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser(
        "status", help="services, instances, health, lease age, loaded versions and load"
    )
    add_store_command_arguments(status)
    status.set_defaults(handler=cmd_status)

    models = subparsers.add_parser("models", help="the model catalog: list, promote, rollback")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_sub.add_parser("list", help="published versions and their stage")
    listing.add_argument("--model", help="only this model")
    add_store_command_arguments(listing)
    listing.set_defaults(handler=cmd_models_list)
    served = models_sub.add_parser(
        "served",
        help="what the inference workers serve now, merged over the fleet by the gateway",
        description="The gateway's RepositoryIndex and ModelStatistics: each model version's "
        "state over every inference worker (READY when any serves it; why not, by worker) and "
        "its inferences summed over them.",
    )
    served.add_argument(
        "--gateway", default=None, help="gateway address (default: the running up's)"
    )
    add_state_dir_argument(served)
    served.add_argument(
        "--timeout", type=_positive, default=10.0, metavar="SECONDS", help="(default %(default)g)"
    )
    served.set_defaults(handler=_models_served)
    promote = models_sub.add_parser("promote", help="make a version production")
    promote.add_argument("model")
    promote.add_argument("version")
    promote.add_argument(
        "--expect",
        metavar="VERSION",
        help="fail unless production is currently VERSION ('' = none): guards against races",
    )
    add_store_command_arguments(promote)
    promote.set_defaults(handler=cmd_models_promote)
    rollback = models_sub.add_parser("rollback", help="restore the previous production version")
    rollback.add_argument("model")
    rollback.add_argument("--expect", metavar="VERSION", help="fail unless production is VERSION")
    add_store_command_arguments(rollback)
    rollback.set_defaults(handler=cmd_models_rollback)

    registry = subparsers.add_parser("registry", help="the discovery store itself")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    serve = registry_sub.add_parser(
        "serve-store", help="run the local Elasticsearch-compatible store in the foreground"
    )
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data directory")
    serve.add_argument("--port", type=port_number, default=None, help="port (default: a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.set_defaults(handler=cmd_serve_store)
    sweep = registry_sub.add_parser(
        "sweep", help="delete instance documents whose lease ended long ago (the janitor, once)"
    )
    sweep.add_argument(
        "--retention",
        type=float,
        default=DEFAULT_RETENTION.total_seconds(),
        metavar="SECONDS",
        help="keep dead instances this long (default: %(default)s)",
    )
    add_store_command_arguments(sweep)
    sweep.set_defaults(handler=cmd_sweep)
