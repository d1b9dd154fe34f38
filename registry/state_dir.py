"""The state folder of a running ``meshserve up`` and its up.json: where its store and gateway
are, for any command that needs them.

Here, below every component, because the gateway's, the sidecar's and the workers' own
commands find the store through it (``registry.locate``) as the CLI does, and none of them
may import the CLI. It is the store's location as much as ``registry.embedded``'s endpoint
file is. ``up`` (cli/) writes the file; what it adds about its supervised units is the CLI's
(``cli.endpoints.UpStatus``), read here as unknown keys and ignored.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

#: Environment variable naming the state folder of ``meshserve up`` (beats ``.meshserve``).
STATE_DIR_ENV = "MESHSERVE_STATE_DIR"
FALLBACK_STATE_DIR = Path(".meshserve")
#: The state folder ``meshserve up`` uses unless told otherwise (read once, at import).
DEFAULT_STATE_DIR = Path(os.environ.get(STATE_DIR_ENV, str(FALLBACK_STATE_DIR)))
#: Written by ``up`` once the mesh is ready, removed when it stops.
UP_FILE = "up.json"


@dataclass(frozen=True)
class UpEndpoints:
    """The addresses of a running ``meshserve up``."""

    gateway: str
    es_url: str
    pid: int
    components: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "es_url": self.es_url,
            "pid": self.pid,
            "components": dict(self.components),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Self:
        """Raises KeyError, TypeError or ValueError on a malformed document."""
        return cls(
            gateway=str(raw["gateway"]),
            es_url=str(raw["es_url"]),
            pid=int(raw["pid"]),
            components={str(k): str(v) for k, v in dict(raw["components"]).items()},
        )

    def write(self, state_dir: Path) -> None:
        # Atomic: a reader never sees half a file.
        tmp = state_dir / f".{UP_FILE}.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(state_dir / UP_FILE)

    @classmethod
    def read(cls, state_dir: Path = DEFAULT_STATE_DIR) -> Self | None:
        """The endpoints of a live ``up`` under ``state_dir``; None if none runs there."""
        try:
            endpoints = cls.from_json(json.loads((state_dir / UP_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            os.kill(endpoints.pid, 0)
        except ProcessLookupError:
            return None  # a file left by an `up` that was killed
        except PermissionError:
            pass
        return endpoints


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
