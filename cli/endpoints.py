"""Where the running ``meshserve up`` is: ``<state dir>/up.json``, read by the other commands."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.supervision.units import UnitStatus

#: Environment variable naming the state folder of ``meshserve up`` (beats ``.meshserve``).
STATE_DIR_ENV = "MESHSERVE_STATE_DIR"
FALLBACK_STATE_DIR = Path(".meshserve")
#: The state folder ``meshserve up`` uses unless told otherwise (read once, at import).
DEFAULT_STATE_DIR = Path(os.environ.get(STATE_DIR_ENV, str(FALLBACK_STATE_DIR)))
#: Written by ``up`` once the mesh is ready, removed when it stops.
UP_FILE = "up.json"
#: Environment variable naming the gateway (beats up.json).
GATEWAY_ENV = "MESHSERVE_GATEWAY"
FALLBACK_GATEWAY = "127.0.0.1:8080"


@dataclass(frozen=True)
class UpEndpoints:
    """The addresses of a running ``meshserve up``."""

    gateway: str
    es_url: str
    pid: int
    components: dict[str, str]
    #: Each supervised unit's state, pid, restarts and last exit (absent from older files).
    units: tuple[UnitStatus, ...] = ()

    @classmethod
    def of_units(cls, gateway: str, es_url: str, units: tuple[UnitStatus, ...]) -> UpEndpoints:
        """This process's mesh: each supervised unit's address by name, and its state."""
        return cls(
            gateway=gateway,
            es_url=es_url,
            pid=os.getpid(),
            components={u.name: u.address for u in units},
            units=units,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "es_url": self.es_url,
            "pid": self.pid,
            "components": dict(self.components),
            "units": [unit.to_json() for unit in self.units],
        }

    def write(self, state_dir: Path) -> None:
        # Atomic: a reader never sees half a file.
        tmp = state_dir / f".{UP_FILE}.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(state_dir / UP_FILE)

    @classmethod
    def read(cls, state_dir: Path = DEFAULT_STATE_DIR) -> UpEndpoints | None:
        """The endpoints of a live ``up`` under ``state_dir``; None if none runs there."""
        try:
            raw = json.loads((state_dir / UP_FILE).read_text())
            endpoints = cls(
                gateway=str(raw["gateway"]),
                es_url=str(raw["es_url"]),
                pid=int(raw["pid"]),
                components={str(k): str(v) for k, v in dict(raw["components"]).items()},
                units=tuple(UnitStatus.from_json(dict(u)) for u in raw.get("units", ())),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            os.kill(endpoints.pid, 0)
        except ProcessLookupError:
            return None  # a file left by an `up` that was killed
        except PermissionError:
            pass
        return endpoints


def default_gateway(state_dir: Path = DEFAULT_STATE_DIR) -> str:
    """$MESHSERVE_GATEWAY, else the gateway of the running ``up``, else 127.0.0.1:8080."""
    if os.environ.get(GATEWAY_ENV):
        return os.environ[GATEWAY_ENV]
    endpoints = UpEndpoints.read(state_dir)
    return endpoints.gateway if endpoints is not None else FALLBACK_GATEWAY


def add_state_dir_argument(parser: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """``--state-dir``: where to find the running ``up`` (one flag, the same on every command).

    ``hidden`` is for a sub-command that repeats its parent's flag: without a default of its
    own it cannot overwrite what was given before the sub-command's name.
    """
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS if hidden else None,
        metavar="DIR",
        help=argparse.SUPPRESS
        if hidden
        else f"state folder of the running `meshserve up` (default: ${STATE_DIR_ENV}, "
        f"else {FALLBACK_STATE_DIR})",
    )


def state_dir_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Path:
    """--state-dir, else $MESHSERVE_STATE_DIR, else .meshserve; read when the command runs."""
    chosen = getattr(args, "state_dir", None)
    if chosen:
        return Path(chosen)
    env = os.environ if env is None else env
    return Path(env.get(STATE_DIR_ENV) or FALLBACK_STATE_DIR)


def gateway_from_args(args: argparse.Namespace, given: str | None) -> str:
    """``given`` (an --address/--gateway flag), else ``default_gateway`` of the state dir."""
    return given or default_gateway(state_dir_from_args(args))
