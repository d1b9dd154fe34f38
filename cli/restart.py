"""``meshserve restart NAME``: a rolling restart of one unit of the running ``meshserve up``.

It sends the unit's process SIGTERM, exactly what an operator's ``kill -TERM`` or Kubernetes
deleting a pod does: the unit drains (its sidecar advertises DRAINING, deregisters, finishes
in-flight calls, then stops its worker) and exits cleanly, and ``up``'s supervisor, which
restarts any unit that exits, starts it again at once. A signal needs no control socket and
no protocol in ``up``: ``up.json`` already names each unit's pid, and the one code path
(a unit exited, restart it) serves crashes, operators and this command alike.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from rich.console import Console

from cli.admin_credential import own_admin_metadata
from cli.endpoints import UpStatus
from cli.routed import routed_endpoints, unrouted, wait_routed
from cli.supervision.units import UnitState, UnitStatus
from mesh.cli_error import CliError
from registry.state_dir import DEFAULT_STATE_DIR

out = Console()

#: How long to wait for the unit to be back (drain, start, ready, routed) unless --no-wait.
WAIT_TIMEOUT_S = 120.0


def find_unit(units: tuple[UnitStatus, ...], name: str) -> UnitStatus:
    """The unit called ``name``: its slug ("inference-1"), or its name as ``up`` prints it,
    with spaces or dashes ("inference worker 1", "inference-worker-1")."""
    wanted = name.strip().lower()
    for unit in units:
        if wanted in (unit.slug, unit.name.lower(), unit.name.lower().replace(" ", "-")):
            return unit
    known = ", ".join(unit.slug for unit in units) or "none"
    raise CliError(f"no unit named {name!r} in meshserve up (units: {known})")


def _is_meshserve(pid: int) -> bool:
    """Guards against a reused pid: the process must be one of ours."""
    try:
        return b"cli.main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def cmd_restart(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    endpoints = UpStatus.read(state)
    if endpoints is None:
        raise CliError(f"no meshserve up runs on {state.resolve()}")
    unit = find_unit(endpoints.units, args.name)
    if unit.state is not UnitState.RUNNING or unit.pid is None:
        raise CliError(f"{unit.name} is {unit.describe_state(time.time())}: nothing to restart")
    if not _is_meshserve(unit.pid):
        raise CliError(f"pid {unit.pid} of {unit.name} is no meshserve process (stale up.json?)")
    # Back means the gateway routes as it did before: to the restarted worker again (its
    # ready line comes before its worker serves, and a script restarting the next unit at
    # the ready line could leave no healthy endpoint), and, after a gateway restart, to
    # every worker (it listens before its first registry read).
    metadata = own_admin_metadata(state)
    routed = routed_endpoints(endpoints.gateway, metadata) if not args.no_wait else None
    routed_units = set() if routed is None else routed_names(endpoints.units, routed)
    os.kill(unit.pid, signal.SIGTERM)
    out.print(f"{unit.name}: draining (pid {unit.pid})", highlight=False)
    if args.no_wait:
        return 0
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        now = UpStatus.read(state)
        if now is None:
            raise CliError("meshserve up stopped")
        again = find_unit(now.units, unit.name)
        if again.state is UnitState.RUNNING and again.pid != unit.pid:
            # Units that stopped or restart meanwhile (a crash, a scale-down) are not awaited.
            wanted = {
                u.name: u.address
                for u in now.units
                if u.name in routed_units and u.state is UnitState.RUNNING
            }
            if wanted:
                wait_routed(
                    now.gateway, metadata, wanted, timeout=max(deadline - time.monotonic(), 0.0)
                )
            how = (
                ", routed by the gateway"
                if unit.name in routed_units
                else ", the gateway routes as before"
                if wanted
                else ""
            )
            out.print(f"{unit.name}: running again (pid {again.pid}){how}", highlight=False)
            return 0
        if again.state is UnitState.FAILED:
            raise CliError(f"{unit.name} {again.describe_state(time.time())}")
        time.sleep(0.2)
    raise CliError(f"{unit.name} was not back within {WAIT_TIMEOUT_S:.0f} s")


def routed_names(units: tuple[UnitStatus, ...], routed: set[str]) -> set[str]:
    """The units (by name) whose address is among the ``routed`` endpoints."""
    return {u.name for u in units if u.address and not unrouted([u.address], routed)}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "restart",
        help="rolling restart of one unit of `meshserve up` (drain, then start again)",
        description="Sends the unit's process SIGTERM: it drains with no failed requests and "
        "`up` starts it again. NAME as `meshserve status` lists it (inference-1, gateway, store).",
    )
    parser.add_argument("name", metavar="NAME", help="the unit, e.g. inference-1")
    parser.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE_DIR),
        help="the state folder of the running up (default %(default)s)",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="return once signalled, not once it is back"
    )
    parser.set_defaults(handler=cmd_restart)
