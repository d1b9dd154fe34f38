"""The supervisor loop's body: notices exits, restarts units on the policy's schedule, reports.

One ``tick`` per pass of ``up``'s main loop, on the main thread (``spawn`` must run there, see
``processes.spawn``); only the wait for a restarted unit's ready line runs on a helper thread,
which hands its result back through a queue. The decisions are ``policy.RestartTracker``'s.

Units come and go with the autoscaler (``elastic``): ``add`` starts a new one, ``retire`` asks
one to drain and stop; a retired unit's exit is the end of it, never a reason to restart it.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cli.supervision.policy import GiveUp, RestartPolicy, RestartTracker
from cli.supervision.processes import (
    Component,
    Running,
    Spawned,
    await_ready,
    kill_group,
    spawn,
    stop_together,
)
from cli.supervision.units import UnitState, UnitStatus, describe_exit

#: Exit statuses of a unit that stopped because it was asked to (it drained and exited).
_CLEAN = (0, -signal.SIGTERM)


@dataclass
class Unit:
    """One supervised component and where it stands."""

    component: Component
    log: Path
    tracker: RestartTracker
    running: Running | None = None
    starting: Spawned | None = None
    state: UnitState = UnitState.RUNNING
    last_exit: str | None = None
    #: Monotonic time of the next start while RESTARTING.
    restart_at: float | None = None
    failure: str | None = None
    #: Asked to stop for good (scaled down): its exit removes it instead of restarting it.
    retiring: bool = False
    #: Started by ``add`` (a scale-up), not yet seen ready once.
    added: bool = False


@dataclass
class Supervisor:
    verbose: int
    #: Prints one line for the operator (rich markup allowed).
    say: Callable[[str], None]
    #: Called after any unit changed state (``up`` rewrites up.json).
    on_change: Callable[[], None]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    units: list[Unit] = field(default_factory=list)
    _ready: queue.Queue[tuple[Unit, Running | str]] = field(default_factory=queue.Queue)

    def adopt(self, running: Running, log: Path) -> None:
        """Supervises a component that ``up`` started and saw ready."""
        tracker = RestartTracker(self.policy)
        tracker.started(self.clock())
        self.units.append(Unit(running.component, log, tracker, running=running))

    def start_together(
        self, components: Sequence[Component], log_of: Callable[[Component], Path]
    ) -> list[Running]:
        """Starts components side by side (each mostly waits on its imports) and adopts
        every one, a failed one too, so that ``stop_all`` reaps it; then raises the first
        failure, if any. The started ones, in order."""
        spawned = [spawn(c, self.verbose, log_of(c)) for c in components]
        results: list[Running | BaseException | None] = [None] * len(spawned)

        def one(i: int) -> None:
            try:
                results[i] = await_ready(spawned[i], self.verbose)
            except BaseException as exc:
                results[i] = exc

        threads = [
            threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(spawned))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        started: list[Running] = []
        failure: BaseException | None = None
        for each, result in zip(spawned, results, strict=True):
            if isinstance(result, Running):
                self.adopt(result, log_of(each.component))
                started.append(result)
                self.say(f"[green]✓[/] {each.component.name} [dim]{result.address}[/]")
            else:
                self.adopt(Running(each.component, each.process, ""), log_of(each.component))
                failure = failure or result
        if failure is not None:
            raise failure
        return started

    def add(self, component: Component, log: Path) -> Unit:
        """Starts a new unit (a scale-up); it is RUNNING once its ready line comes."""
        unit = Unit(component, log, RestartTracker(self.policy), added=True)
        self.units.append(unit)
        self._start(unit)
        self.on_change()
        return unit

    def retire(self, unit: Unit) -> None:
        """Asks a running unit to drain and stop for good (a scale-down).

        SIGTERM is the unit's drain: its sidecar advertises DRAINING, deregisters, lets
        in-flight calls finish, then the worker stops (``mesh.sidecar.launcher``).
        """
        if unit.retiring or unit.running is None:
            return
        unit.retiring = True
        if unit.running.process.poll() is None:
            unit.running.process.send_signal(signal.SIGTERM)
        self.say(f"[cyan]{unit.component.name} scaling down: draining[/]")
        self.on_change()

    def tick(self) -> None:
        """One pass: reap exits, collect restarted units' readiness, start due restarts."""
        now = self.clock()
        changed = False
        for unit in self.units:
            process = unit.running.process if unit.running is not None else None
            if unit.state is UnitState.RUNNING and process is not None:
                code = process.poll()
                if code is not None:
                    kill_group(process)  # whatever it spawned (a unit's worker) goes with it
                    if unit.retiring:
                        unit.running = None
                        unit.state = UnitState.STOPPED
                        unit.last_exit = describe_exit(code)
                        self.say(f"[cyan]{unit.component.name} scaled down ({unit.last_exit})[/]")
                    else:
                        self._exited(unit, describe_exit(code), requested=code in _CLEAN, now=now)
                    changed = True
        # A retired unit is gone: it is neither reported nor restarted.
        self.units = [u for u in self.units if not (u.retiring and u.state is UnitState.STOPPED)]
        while True:
            try:
                unit, result = self._ready.get_nowait()
            except queue.Empty:
                break
            unit.starting = None
            changed = True
            if isinstance(result, Running):
                unit.running = result
                unit.state = UnitState.RUNNING
                unit.tracker.started(now)
                how = "started (scale-up)" if unit.added else "restarted"
                unit.added = False
                self.say(f"[green]✓[/] {unit.component.name} {how} [dim]{result.address}[/]")
            else:
                self._exited(unit, result, requested=False, now=now)
        for unit in self.units:
            if unit.state is UnitState.RESTARTING and (unit.restart_at or 0.0) <= now:
                self._start(unit)
                changed = True
        if changed:
            self.on_change()

    def _exited(self, unit: Unit, reason: str, *, requested: bool, now: float) -> None:
        unit.running = None
        unit.last_exit = reason
        decision = unit.tracker.exited(now, requested=requested)
        name = unit.component.name
        if isinstance(decision, GiveUp):
            unit.state = UnitState.FAILED
            unit.failure = decision.reason
            unit.restart_at = None
            self.say(
                f"[bold red]{name} {reason}; failed: {decision.reason}[/] "
                f"(the rest keeps serving; log: {unit.log})"
            )
            return
        unit.state = UnitState.RESTARTING
        unit.restart_at = decision.at
        self.say(f"[yellow]{name} {reason}; restarting in {decision.delay_s:.1f} s[/]")

    def _start(self, unit: Unit) -> None:
        spawned = spawn(unit.component, self.verbose, unit.log)
        unit.starting = spawned
        unit.state = UnitState.STARTING
        unit.restart_at = None

        def wait() -> None:
            try:
                self._ready.put((unit, await_ready(spawned, self.verbose)))
            except Exception as exc:  # the reason is reported; the policy decides what next
                code = spawned.process.poll()
                reason = describe_exit(code) if code is not None else str(exc)
                self._ready.put((unit, f"{reason} before it was ready"))

        threading.Thread(target=wait, daemon=True).start()

    def statuses(self) -> tuple[UnitStatus, ...]:
        now, wall = self.clock(), self.wall()
        result = []
        for unit in self.units:
            process = (
                unit.running.process
                if unit.running is not None
                else unit.starting.process
                if unit.starting is not None
                else None
            )
            restart_at = unit.restart_at
            result.append(
                UnitStatus(
                    name=unit.component.name,
                    state=UnitState.DRAINING if unit.retiring else unit.state,
                    pid=process.pid if process is not None else None,
                    restarts=unit.tracker.restarts,
                    last_exit=unit.last_exit,
                    restart_at=wall + (restart_at - now) if restart_at is not None else None,
                    address=unit.running.address if unit.running is not None else "",
                    failure=unit.failure,
                )
            )
        return tuple(result)

    @property
    def failed(self) -> list[str]:
        return [u.component.name for u in self.units if u.state is UnitState.FAILED]

    def stop_all(self) -> list[tuple[str, int]]:
        """Stops every unit, highest tier first; the names and statuses of unclean stops."""
        unclean: list[tuple[str, int]] = []
        live: list[Running] = []
        for unit in self.units:
            if unit.running is not None:
                live.append(unit.running)
            elif unit.starting is not None:
                live.append(Running(unit.component, unit.starting.process, ""))
        for tier in sorted({r.component.tier for r in live}, reverse=True):
            group = [r for r in live if r.component.tier == tier]
            for running, code in zip(group, stop_together(group), strict=True):
                if code not in _CLEAN:
                    unclean.append((running.component.name, code))
        for unit in self.units:
            unit.state = UnitState.STOPPED
        return unclean
