"""Where the running ``meshserve up`` is: ``<state dir>/up.json``, read by the other commands."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.cli.supervision.units import UnitStatus

#: The state folder ``meshserve up`` uses unless told otherwise.
DEFAULT_STATE_DIR = Path(os.environ.get("MESHSERVE_STATE_DIR", ".meshserve"))
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
