"""The units table of ``meshserve status``: what ``up`` wrote in up.json, for people."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cli.endpoints import UpStatus
from cli.supervision.units import UnitState, UnitStatus

_COLORS = {
    UnitState.RUNNING: "green",
    UnitState.STARTING: "yellow",
    UnitState.RESTARTING: "yellow",
    UnitState.FAILED: "red",
    UnitState.STOPPED: "dim",
}


def units_table(units: tuple[UnitStatus, ...], now: float) -> Table:
    """Pure (``now`` is wall-clock seconds), so it is testable."""
    table = Table(title="meshserve up units")
    for column in ("unit", "state", "pid", "restarts", "last exit", "address"):
        table.add_column(column, justify="right" if column in ("pid", "restarts") else "left")
    for unit in units:
        color = _COLORS[unit.state]
        table.add_row(
            unit.slug,
            f"[{color}]{unit.describe_state(now)}[/]",
            str(unit.pid) if unit.pid is not None else "-",
            str(unit.restarts),
            unit.last_exit or "-",
            unit.address or "-",
        )
    return table


def print_units(state_dir: Path, console: Console) -> bool:
    """Prints the running ``up``'s units; False when none runs under ``state_dir``."""
    endpoints = UpStatus.read(state_dir)
    if endpoints is None or not endpoints.units:
        return False
    console.print(units_table(endpoints.units, time.time()))
    return True
