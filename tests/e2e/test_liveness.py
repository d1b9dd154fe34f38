"""Chaos, continued: under `meshserve up`, a worker that stays hung is restarted (liveness).

test_chaos.py's SIGSTOP case shows a short hang routed around and ridden out, with nothing
restarted. Here the hang outlasts the liveness window, shortened to 4 s for the whole mesh
through the environment (``MESHSERVE_LIVENESS_WINDOW``, which ``up`` passes to every unit):
the unit kills its worker, up's supervisor restarts the unit, and the gateway routes to it
again, all while ModelInfer load runs. Its own ``up``: the window must not apply to the
chaos module's mesh, whose hung worker must outlive the hang.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from cli.supervision.units import describe_exit
from mesh.sidecar.launcher import LIVENESS_ENV
from mesh.sidecar.liveness import HUNG_EXIT_STATUS
from tests.e2e.test_chaos import (
    BACK_TIMEOUT_S,
    CALLERS,
    SETTLED_TIMEOUT_S,
    poll,
    port,
    ring_owner_port,
    settled,
    worker_pid,
)
from tests.support.load import InferLoad, routed_inference_ports
from tests.support.up import Up, alive, cli, running_up

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WINDOW_S = 4.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running_up(tmp_path_factory.mktemp("liveness"), env={LIVENESS_ENV: str(WINDOW_S)}) as up:
        yield up


def test_a_worker_hung_past_the_liveness_window_is_restarted_under_load(mesh: Up) -> None:
    settled(mesh)
    gateway = mesh.endpoints()["gateway"]
    owner = ring_owner_port(mesh, "demo")
    ((slug, before),) = [(s, u) for s, u in mesh.units().items() if port(u["address"]) == owner]
    worker = worker_pid(before)
    with InferLoad(gateway, callers=CALLERS) as load:
        started = time.monotonic()
        poll("the load to get through", lambda: load.succeeded_after(started), 30)
        struck = time.monotonic()
        os.kill(worker, signal.SIGSTOP)
        try:
            poll("the unit to kill its hung worker", lambda: not alive(worker), 60)
            killed = time.monotonic()

            def back() -> bool:
                unit = mesh.units()[slug]
                return bool(unit["state"] == "running" and unit["pid"] != before["pid"])

            poll(f"{slug} to be restarted", back, BACK_TIMEOUT_S)
            after = mesh.units()[slug]
            poll(
                f"the gateway to route to the restarted {slug}",
                lambda: port(after["address"]) in routed_inference_ports(gateway, mesh.state),
                SETTLED_TIMEOUT_S,
            )
            routed = time.monotonic()
            poll("a call to succeed after the restart", lambda: load.succeeded_after(routed), 30)
        finally:
            if alive(worker):  # the unit never gave up on it: let the fixture stop it
                os.kill(worker, signal.SIGCONT)
    failed = [o for o in load.outcomes if o.code is not None]
    print(
        f"\nhung at 0 s; worker killed at +{killed - struck:.1f} s; restarted unit routed at "
        f"+{routed - struck:.1f} s; {len(failed)} of {len(load.outcomes)} calls failed: "
        f"{sorted({str(o.code) for o in failed})}"
    )
    # The window is a floor: nothing kills a worker that answered within it.
    assert killed - struck >= WINDOW_S
    # Only calls sent to the hung worker before the gateway routed around it may fail, on
    # their deadline (or cut off when it was killed): never one sent after the restart.
    assert all(o.started < killed for o in failed), failed
    assert {o.code for o in failed} <= {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
    }, failed
    # A restart like a crash's: counted, and the reason says why.
    assert after["restarts"] == before["restarts"] + 1
    assert after["last_exit"] == describe_exit(HUNG_EXIT_STATUS), after
    status = cli("status", "--state-dir", str(mesh.state), "--es", mesh.endpoints()["es_url"])
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if slug in line)
    assert "running" in row and "worker hung" in row and str(after["pid"]) in row, row
