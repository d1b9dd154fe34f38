"""What ``meshserve up`` reports in up.json beyond its addresses, and the gateway a command
talks to.

The file's address part, the state folder and its flag live in ``registry.state_dir``, below
the components that read them too; the units are the supervisor's, so they stay here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from cli.supervision.units import UnitStatus
from registry.state_dir import DEFAULT_STATE_DIR, UpEndpoints, state_dir_from_args

#: Environment variable naming the gateway (beats up.json).
GATEWAY_ENV = "MESHSERVE_GATEWAY"
FALLBACK_GATEWAY = "127.0.0.1:8080"


@dataclass(frozen=True)
class UpStatus(UpEndpoints):
    """A running ``meshserve up``: its addresses and each supervised unit's state."""

    #: Each supervised unit's state, pid, restarts and last exit (absent from older files).
    units: tuple[UnitStatus, ...] = ()

    @classmethod
    def of_units(cls, gateway: str, es_url: str, units: tuple[UnitStatus, ...]) -> UpStatus:
        """This process's mesh: each supervised unit's address by name, and its state."""
        return cls(
            gateway=gateway,
            es_url=es_url,
            pid=os.getpid(),
            components={u.name: u.address for u in units},
            units=units,
        )

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "units": [unit.to_json() for unit in self.units]}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Self:
        endpoints = UpEndpoints.from_json(raw)
        return cls(
            gateway=endpoints.gateway,
            es_url=endpoints.es_url,
            pid=endpoints.pid,
            components=endpoints.components,
            units=tuple(UnitStatus.from_json(dict(u)) for u in raw.get("units", ())),
        )


def default_gateway(state_dir: Path = DEFAULT_STATE_DIR) -> str:
    """$MESHSERVE_GATEWAY, else the gateway of the running ``up``, else 127.0.0.1:8080."""
    if os.environ.get(GATEWAY_ENV):
        return os.environ[GATEWAY_ENV]
    endpoints = UpEndpoints.read(state_dir)
    return endpoints.gateway if endpoints is not None else FALLBACK_GATEWAY


def gateway_from_args(args: argparse.Namespace, given: str | None) -> str:
    """``given`` (an --address/--gateway flag), else ``default_gateway`` of the state dir."""
    return given or default_gateway(state_dir_from_args(args))
