"""Chaos under load: `meshserve up` keeps serving while one process of each kind is killed.

Run: ``.venv/bin/python -m bench.chaos [--callers 8] [--seconds 60]``.

Starts ``meshserve up`` (a fresh state folder, the demo model trained), then keeps
``--callers`` clients calling ModelInfer through its gateway. The ``--seconds`` are split into
one window per kind; in each, one process is killed with SIGKILL two seconds in, and the window
lasts until the supervisor has it back (and, for an inference unit, the gateway routes to it
again), and at least its share of the time. Per kind: requests sent, failed, and the time to
recover (kill to the unit running and serving again; for the gateway, kill to the end of the
clients' outage). Target: no failed request but for the gateway (the clients' only path),
which should be back within ~5 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.mesh_process import MeshProcess
from tests.support.load import InferLoad, routed_inference_ports

READY_TIMEOUT_S = 240.0
BACK_TIMEOUT_S = 180.0
out = Console()


@dataclass(frozen=True)
class Kind:
    label: str
    slug: str
    #: The pid to kill, from the unit's entry in up.json.
    target: Callable[[dict[str, Any]], int]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _worker(unit: dict[str, Any]) -> int:
    """The `meshserve worker` child of a `meshserve run` unit."""
    for pid in _children(int(unit["pid"])):
        if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise RuntimeError(f"{unit['name']} has no worker child")


def _unit(unit: dict[str, Any]) -> int:
    return int(unit["pid"])


KINDS = (
    Kind("inference worker", "inference-1", _worker),
    Kind("inference sidecar (unit)", "inference-2", _unit),
    Kind("training worker unit", "training-1", _unit),
    Kind("data worker unit", "data-1", _unit),
    Kind("store", "store", _unit),
    Kind("gateway", "gateway", _unit),
)


@dataclass(frozen=True)
class Row:
    kind: str
    sent: int
    failed: int
    recover_s: float


def _until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.1)


def _whole(mesh: MeshProcess) -> bool:
    units = mesh.units()
    if any(u["state"] != "running" for u in units.values()):
        return False
    inference = {u["address"].rsplit(":", 1)[1] for s, u in units.items() if s.startswith("infer")}
    return routed_inference_ports(mesh.up()["gateway"], mesh.state) == inference


def one_kind(mesh: MeshProcess, kind: Kind, callers: int, window_s: float) -> Row:
    _until(lambda: _whole(mesh), 90)
    before = mesh.units()[kind.slug]
    gateway = mesh.up()["gateway"]
    with InferLoad(gateway, callers=callers) as load:
        began = time.monotonic()
        time.sleep(2.0)
        struck = time.monotonic()
        os.kill(kind.target(before), signal.SIGKILL)

        def back() -> bool:
            unit = mesh.units()[kind.slug]
            if unit["state"] != "running" or unit["pid"] == before["pid"]:
                return False
            if kind.slug.startswith("inference"):
                return unit["address"].rsplit(":", 1)[1] in routed_inference_ports(
                    gateway, mesh.state
                )
            return True

        _until(back, BACK_TIMEOUT_S)
        recovered = time.monotonic() - struck
        time.sleep(max(2.0, window_s - (time.monotonic() - began)))
    failed = [o for o in load.outcomes if o.code is not None]
    if kind.slug == "gateway" and failed:
        recovered = max(o.ended for o in failed) - struck  # the clients' outage
    return Row(kind.label, len(load.outcomes), len(failed), recovered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="load time, split by kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = MeshProcess(
            ("up", "--port", "0", "--demo-epochs", "1"), Path(tmp) / "state", Path(tmp) / "up.log"
        )
        try:
            with out.status("starting meshserve up (trains the demo model)"):
                mesh.wait_ready(READY_TIMEOUT_S)
            rows = []
            for kind in KINDS:
                with out.status(f"killing the {kind.label} under load"):
                    rows.append(one_kind(mesh, kind, args.callers, args.seconds / len(KINDS)))
        finally:
            mesh.stop()
    table = Table(
        title=f"SIGKILL under load: {args.callers} callers, ModelInfer through the gateway"
    )
    for column in ("killed", "requests", "failed", "recovered in"):
        table.add_column(column, justify="left" if column == "killed" else "right")
    for row in rows:
        table.add_row(row.kind, str(row.sent), str(row.failed), f"{row.recover_s:.1f} s")
    out.print(table)


if __name__ == "__main__":
    main()
