"""What the inference fleet serves now, through the gateway: ``meshserve models served``
and the "served models" table of ``meshserve status``.

The gateway answers RepositoryIndex and ModelStatistics for every worker at once
(gateway/fleet.py), so this is the same merged view a Triton client gets.
"""

from __future__ import annotations

import argparse

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.endpoints import gateway_from_args
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

#: A status line must not wait long on a gateway that is not there.
STATUS_TIMEOUT_S = 3.0
_STATE_STYLE = {"READY": "green", "LOADING": "yellow"}


def fetch(
    address: str, timeout: float
) -> tuple[pb.RepositoryIndexResponse, pb.ModelStatisticsResponse]:
    """The fleet's merged index and statistics from the gateway at ``address``."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=timeout)
    return index, stats


def served_table(
    index: pb.RepositoryIndexResponse, stats: pb.ModelStatisticsResponse, title: str
) -> Table:
    """One row per model version: its state over the fleet, inferences summed over the
    workers, and why a version is not ready (by worker). Pure, so it is testable."""
    counts = {(s.name, s.version): s.inference_count for s in stats.model_stats}
    table = Table(title=title)
    for column in ("model", "version", "state", "inferences", "reason"):
        table.add_column(column, justify="right" if column == "inferences" else "left")
    for row in index.models:
        style = _STATE_STYLE.get(row.state, "red")
        count = counts.get((row.name, row.version))
        table.add_row(
            row.name,
            row.version or "-",
            f"[{style}]{row.state}[/]",
            "-" if count is None else str(count),
            escape(row.reason),
        )
    return table


def print_served(console: Console, address: str, timeout: float) -> bool:
    """The served-models table, or one line saying why there is none; True if shown."""
    try:
        index, stats = fetch(address, timeout)
    except grpc.RpcError as exc:
        # A channel's errors are also grpc.Call (code, details); the base class is not.
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        console.print(
            f"[dim]served models: gateway {address} did not answer: {code}: {escape(str(details))}[/]"
        )
        return False
    if not index.models:
        console.print(f"served models: none (gateway {address})")
        return True
    console.print(served_table(index, stats, f"served models (gateway {address})"))
    return True


def cmd_models_served(args: argparse.Namespace) -> int:
    address = gateway_from_args(args, args.gateway)
    index, stats = fetch(address, args.timeout)
    console = Console()
    if not index.models:
        console.print("no models in the inference workers' repository")
        return 0
    console.print(served_table(index, stats, f"served models (gateway {address})"))
    return 0
