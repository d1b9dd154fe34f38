"""What ``up`` reports about each supervised unit (in ``up.json``, shown by ``meshserve status``).

Pure data and formatting: the supervisor writes these, ``status`` and ``restart`` read them.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from mesh.sidecar.liveness import HUNG_EXIT_STATUS


class UnitState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"
    #: Scaled down: draining, then gone (never restarted).
    DRAINING = "draining"


@dataclass(frozen=True)
class UnitStatus:
    """One unit as ``up`` last saw it."""

    name: str
    state: UnitState
    pid: int | None
    restarts: int = 0
    #: Why its process last ended ("killed by SIGKILL", "exited with status 1"), if it did.
    last_exit: str | None = None
    #: Wall-clock time (epoch seconds) of the next start while RESTARTING.
    restart_at: float | None = None
    address: str = ""
    #: Why it was given up on while FAILED.
    failure: str | None = None

    @property
    def slug(self) -> str:
        return slug(self.name)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value, "slug": self.slug}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> UnitStatus:
        pid = raw.get("pid")
        restart_at = raw.get("restart_at")
        return cls(
            name=str(raw["name"]),
            state=UnitState(raw["state"]),
            pid=int(pid) if pid is not None else None,
            restarts=int(raw.get("restarts", 0)),
            last_exit=raw.get("last_exit"),
            restart_at=float(restart_at) if restart_at is not None else None,
            address=str(raw.get("address", "")),
            failure=raw.get("failure"),
        )

    def describe_state(self, now: float) -> str:
        """ "running", "restarting in 1.5 s", "failed: ...", ...; ``now`` is wall-clock time."""
        if self.state is UnitState.RESTARTING and self.restart_at is not None:
            return f"restarting in {max(0.0, self.restart_at - now):.1f} s"
        if self.state is UnitState.FAILED and self.failure:
            return f"failed ({self.failure})"
        return self.state.value


def slug(name: str) -> str:
    """The name ``meshserve restart`` accepts: "inference worker 1" -> "inference-1"."""
    words = name.lower().split()
    if len(words) == 3 and words[1] == "worker":
        words = [words[0], words[2]]  # "inference worker 1" -> "inference-1"
    return "-".join(words)


def describe_exit(returncode: int) -> str:
    """A process's end in words, as ``Popen.returncode`` reports it."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    if returncode == HUNG_EXIT_STATUS:
        # ``meshserve run`` killed its worker: no health check answered for its liveness window.
        return f"exited with status {returncode} (worker hung)"
    if returncode > 128 and returncode - 128 in signal.Signals._value2member_map_:
        # A shell-style status: the process re-raised a signal's number as its exit code.
        return f"exited with status {returncode} ({signal.Signals(returncode - 128).name})"
    return f"exited with status {returncode}"
