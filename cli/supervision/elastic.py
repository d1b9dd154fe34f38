"""``up --autoscale``: one service's worker units follow its live load (issue 16's engine).

The decision is ``mesh.scaling.autoscaler``'s; this is the thin shell around it. A thread
reads the service's live instances from the registry once a second (the load their sidecars
publish with each heartbeat); ``tick``, on ``up``'s main thread (``spawn`` must run there),
feeds each new reading to the scaler and applies its decision through the supervisor: new
units for a scale-up, and for a scale-down the least loaded units asked to drain and stop
(their sidecars go DRAINING first, so the gateway stops routing to them before they stop
taking calls). Each decision is one JSON line in ``<state>/autoscale.jsonl``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cli.supervision.processes import Component
from cli.supervision.store_thread import StoreThread
from cli.supervision.supervisor import Supervisor, Unit
from cli.supervision.units import UnitState
from mesh.scaling.autoscaler import Autoscaler, Candidate, Decision, least_loaded
from registry.connect import StoreSettings
from registry.directory import read_live
from registry.instances import Instance, Status, utc_now
from registry.store import Store

log = logging.getLogger(__name__)

#: Seconds between registry reads: the sidecars' heartbeat interval (no fresher load exists).
READ_INTERVAL_S = 1.0
RECONNECT_S = 2.0


@dataclass(frozen=True)
class Reading:
    """One read of the service's live instances."""

    at: float
    instances: tuple[Instance, ...]


def instance_load(instance: Instance) -> int:
    """Requests in flight at the instance. The worker counts a call from arrival to answer,
    so the calls waiting in its batch queue (``queue_depth``) are already in it."""
    return instance.load.in_flight


class LoadFeed(StoreThread):
    """A thread that keeps the latest reading of one service's instances."""

    def __init__(self, settings: StoreSettings, service: str, clock: Callable[[], float]) -> None:
        super().__init__(settings, name="autoscaler", reconnect_s=RECONNECT_S)
        self._service = service
        self._clock = clock
        self._latest: Reading | None = None
        self._lock = threading.Lock()

    def latest(self) -> Reading | None:
        with self._lock:
            return self._latest

    async def work(self, store: Store) -> None:
        while True:
            snapshot = await read_live(store.es, store.indices, utc_now(), self._service)
            reading = Reading(self._clock(), tuple(snapshot.instances.values()))
            with self._lock:
                self._latest = reading
            await asyncio.sleep(READ_INTERVAL_S)


def _port(address: str) -> str:
    return address.rpartition(":")[2]


class ElasticGroup:
    """One service's units, scaled by an :class:`Autoscaler` on a :class:`LoadFeed`."""

    def __init__(
        self,
        *,
        kind: str,
        scaler: Autoscaler,
        feed: LoadFeed,
        supervisor: Supervisor,
        make_component: Callable[[int], Component],
        log_of: Callable[[Component], Path],
        record: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self.scaler = scaler
        self.feed = feed
        self.supervisor = supervisor
        self._make_component = make_component
        self._log_of = log_of
        self._record = record
        self._clock = clock
        self._seen: float | None = None
        self.last: Decision | None = None

    def members(self) -> list[Unit]:
        """The group's units that count as replicas: not retiring, not given up on."""
        prefix = f"{self.kind} worker "
        return [
            u
            for u in self.supervisor.units
            if u.component.name.startswith(prefix)
            and not u.retiring
            and u.state is not UnitState.FAILED
        ]

    def tick(self) -> None:
        reading = self.feed.latest()
        if reading is None or reading.at == self._seen:
            return
        self._seen = reading.at
        load = sum(instance_load(i) for i in reading.instances)
        self.scaler.observe(reading.at, float(load))
        members = self.members()
        current = len(members)
        decision = self.last = self.scaler.decide(reading.at, current)
        self._write(reading, load, current, decision)
        if decision.desired > current:
            self._scale_up(members, decision.desired - current, load, decision)
        elif decision.desired < current:
            self._scale_down(members, reading, current - decision.desired, load, decision)

    def _scale_up(self, members: list[Unit], count: int, load: int, decision: Decision) -> None:
        taken = {
            int(u.component.name.rsplit(" ", 1)[1])
            for u in self.supervisor.units
            if u.component.name.startswith(f"{self.kind} worker ")
        }
        self.supervisor.say(
            f"[cyan]autoscale {self.kind}: {len(members)} → {decision.desired} "
            f"(load {load}{', panic' if decision.panic else ''})[/]"
        )
        number = 1
        for _ in range(count):
            while number in taken:  # the lowest free number: names stay 1..max
                number += 1
            taken.add(number)
            component = self._make_component(number)
            self.supervisor.add(component, self._log_of(component))

    def _scale_down(
        self, members: list[Unit], reading: Reading, count: int, load: int, decision: Decision
    ) -> None:
        running = [u for u in members if u.running is not None and u.state is UnitState.RUNNING]
        serving = {_port(i.address) for i in reading.instances if i.status is Status.SERVING}
        if len(running) < len(members) or any(
            u.running is not None and _port(u.running.address) not in serving for u in running
        ):
            # Units are still starting (or restarting), or running but not yet SERVING (a
            # unit's ready line comes before its worker has loaded its models): wait for
            # them. Draining one of the serving units now could leave none serving.
            return
        by_port = {_port(i.address): instance_load(i) for i in reading.instances}
        candidates = [
            Candidate(u.component.name, by_port.get(_port(u.running.address), 0), order)
            for order, u in enumerate(running)
            if u.running is not None
        ]
        chosen = set(least_loaded(candidates, count))
        if not chosen:
            return
        self.supervisor.say(
            f"[cyan]autoscale {self.kind}: {len(members)} → {len(members) - len(chosen)} "
            f"(load {load})[/]"
        )
        for unit in running:
            if unit.component.name in chosen:
                self.supervisor.retire(unit)

    def _write(self, reading: Reading, load: int, current: int, decision: Decision) -> None:
        if self._record is None:
            return
        line = {
            "time": time.time(),
            "load": load,
            "instances": len(reading.instances),
            "serving": sum(1 for i in reading.instances if i.status.value == "SERVING"),
            "replicas": current,
            "desired": decision.desired,
            "recommended": decision.recommended,
            "panic": decision.panic,
            "stable_load": round(decision.stable_load, 2),
            "panic_load": round(decision.panic_load, 2),
        }
        with self._record.open("a") as sink:
            sink.write(json.dumps(line) + "\n")
