"""``meshserve trace``: a request's spans across gateway, sidecar and worker, as a tree.

Reads the JSON-lines span file that ``meshserve up --traces`` has every process write
(``MESHSERVE_TRACES=file:<state>/traces.jsonl``).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.tree import Tree

from mesh.cli_error import CliError
from registry.state_dir import add_state_dir_argument, state_dir_from_args

out = Console()

TRACES_FILE = "traces.jsonl"
#: Span attributes worth a glance in the tree.
_SHOWN = ("meshserve.route", "meshserve.endpoint", "meshserve.hash_key", "rpc.grpc.status_code")


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Every complete span in the file (a line being written is skipped)."""
    spans = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CliError(
            f"no trace file at {path}: start the mesh with `meshserve up --traces`"
        ) from exc
    for line in lines:
        try:
            span = json.loads(line)
        except ValueError:
            continue
        if _is_span(span):  # a stray line (or a file of something else) is skipped
            spans.append(span)
    return spans


def _is_span(value: Any) -> bool:
    """Whether ``value`` has what the tree reads of a span (OpenTelemetry's JSON)."""
    if not isinstance(value, dict):
        return False
    context = value.get("context")
    return (
        isinstance(context, dict)
        and all(isinstance(context.get(k), str) for k in ("trace_id", "span_id"))
        and all(isinstance(value.get(k), str) for k in ("name", "kind", "start_time", "end_time"))
        and isinstance(value.get("attributes", {}), dict)
        and isinstance(value.get("resource", {}), dict)
    )


def _millis(span: dict[str, Any]) -> float:
    start = datetime.fromisoformat(span["start_time"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(span["end_time"].replace("Z", "+00:00"))
    return (end - start).total_seconds() * 1000


def trace_tree(spans: list[dict[str, Any]], trace_id: str) -> Tree:
    """The spans of one trace, children under their parents, in start order."""
    mine = sorted(
        (s for s in spans if s["context"]["trace_id"] == trace_id), key=lambda s: s["start_time"]
    )
    if not mine:
        raise CliError(f"no spans for trace {trace_id}")
    tree = Tree(f"trace {trace_id}")
    nodes: dict[str, Tree] = {}
    ids = {s["context"]["span_id"] for s in mine}
    pending = list(mine)
    while pending:
        left = []
        for span in pending:
            parent = span.get("parent_id")
            if parent and parent in ids and parent not in nodes:
                left.append(span)  # its parent is not placed yet
                continue
            attrs = span.get("attributes", {})
            details = "  ".join(f"{k.split('.')[-1]}={attrs[k]}" for k in _SHOWN if k in attrs)
            service = span.get("resource", {}).get("attributes", {}).get("service.name", "?")
            label = (
                f"[bold]{service}[/] {span['name']} [dim]{span['kind'].removeprefix('SpanKind.')}"
                f"[/] {_millis(span):.2f} ms  {details}"
            )
            nodes[span["context"]["span_id"]] = (nodes.get(parent, tree) if parent else tree).add(
                label
            )
        if len(left) == len(pending):
            break  # a cycle cannot happen, but never loop forever on bad input
        pending = left
    return tree


def run(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else state_dir_from_args(args) / TRACES_FILE
    spans = read_spans(path)
    trace_id = args.trace_id
    if not trace_id:
        roots = [s for s in spans if not s.get("parent_id") and s["name"] == args.method]
        if not roots:
            raise CliError(f"no {args.method} request traced in {path} yet")
        trace_id = max(roots, key=lambda s: s["start_time"])["context"]["trace_id"]
    elif not trace_id.startswith("0x"):
        trace_id = "0x" + trace_id
    out.print(trace_tree(spans, trace_id))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "trace",
        help="show a request's spans (gateway → sidecar → worker) as a tree",
        description="Prints one trace from the span file of `meshserve up --traces`: by id, "
        "or the latest request to --method.",
    )
    parser.add_argument("trace_id", nargs="?", default="", help="trace id (default: the latest)")
    parser.add_argument(
        "--method",
        default="inference.GRPCInferenceService/ModelInfer",
        help="with no id: the latest trace rooted at this method",
    )
    add_state_dir_argument(parser)
    parser.add_argument("--file", default=None, help="span file (default <state>/traces.jsonl)")
    parser.set_defaults(handler=run)
