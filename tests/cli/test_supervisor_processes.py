"""The supervisor's shell with real child processes: restarts, the intensity limit, a stop."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from cli.supervision.policy import RestartPolicy
from cli.supervision.processes import Component, after, await_ready, spawn
from cli.supervision.supervisor import Supervisor
from cli.supervision.units import UnitState
from registry.embedded import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.1, max_restarts=2, window_s=60)


def tick_until(supervisor: Supervisor, done: object, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, supervisor.statuses()
        supervisor.tick()
        time.sleep(0.05)


def test_a_killed_store_comes_back_on_its_url_and_a_unit_that_cannot_start_is_failed(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    changes: list[int] = []
    supervisor = Supervisor(
        verbose=0, say=said.append, on_change=lambda: changes.append(1), policy=FAST
    )
    port = free_port()
    store = Component(
        "store",
        ("registry", "serve-store", "--data-dir", str(tmp_path / "es"), "--port", str(port)),
        after("elasticsearch "),
    )
    running = await_ready(spawn(store, 0, tmp_path / "store.log"), 0)
    supervisor.adopt(running, tmp_path / "store.log")
    # A unit whose every start fails (an unknown action exits 2 before any ready line).
    broken = Component("broken", ("registry", "no-such-action"), after("never "))
    failing = spawn(broken, 0, tmp_path / "broken.log")
    failing.process.wait(timeout=60)
    supervisor.adopt(
        type(running)(broken, failing.process, ""),  # as `up` adopts a component it started
        tmp_path / "broken.log",
    )
    try:
        first_pid = running.process.pid
        os.kill(first_pid, signal.SIGKILL)

        def settled() -> bool:
            units = {u.name: u for u in supervisor.statuses()}
            return (
                units["store"].state is UnitState.RUNNING
                and units["store"].pid != first_pid
                and units["broken"].state is UnitState.FAILED
            )

        tick_until(supervisor, settled)
        units = {u.name: u for u in supervisor.statuses()}
        assert units["store"].address == f"http://127.0.0.1:{port}"
        assert units["store"].last_exit == "killed by SIGKILL" and units["store"].restarts == 1
        assert units["broken"].restarts == 2
        assert units["broken"].failure == "2 restarts within 60 s (limit 2)"
        assert any("broken" in line and "failed" in line for line in said), said
        assert changes and supervisor.failed == ["broken"]
    finally:
        unclean = supervisor.stop_all()
    assert unclean == []
    assert all(u.state is UnitState.STOPPED for u in supervisor.statuses())


def test_an_added_unit_starts_and_a_retired_one_drains_and_is_never_restarted(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    supervisor = Supervisor(verbose=0, say=said.append, on_change=lambda: None, policy=FAST)
    store = Component(
        "store",
        ("registry", "serve-store", "--data-dir", str(tmp_path / "es"), "--port", str(free_port())),
        after("elasticsearch "),
    )
    try:
        unit = supervisor.add(store, tmp_path / "store.log")
        assert [u.state for u in supervisor.statuses()] == [UnitState.STARTING]
        tick_until(supervisor, lambda: unit.state is UnitState.RUNNING)
        assert any("store started (scale-up)" in line for line in said), said
        assert unit.running is not None
        process = unit.running.process
        supervisor.retire(unit)
        assert [u.state for u in supervisor.statuses()] == [UnitState.DRAINING]
        tick_until(supervisor, lambda: not supervisor.units)
        assert process.poll() is not None  # it stopped: SIGTERM, and it was not restarted
        assert supervisor.statuses() == ()
        assert any("store scaled down" in line for line in said), said
        assert not any("restart" in line for line in said), said
    finally:
        assert supervisor.stop_all() == []
