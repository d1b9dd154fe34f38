"""Chaos: `meshserve up` under steady ModelInfer load while one process of each kind dies.

One module-scoped ``up`` serves every case (starting it and training the demo model is most
of the cost). Each case waits until the mesh is whole (every unit running, the gateway routing
to exactly the live inference units), starts a few client threads calling ModelInfer through
the gateway, injects one fault, waits for the supervisor to bring the process back and for it
to serve, and then checks every call. ModelInfer is idempotent and the gateway retries it on
the next ring successor, so no call may fail while a path survives; a killed gateway is the
one exception (the clients' only path): there the check is that it is back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.load import InferLoad, Outcome, routed_inference_ports
from tests.support.up import Up, children, cli, cmdline, running_up
from workers.inference.repository import COLD_LOAD

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

#: A unit's backoff (0.5 s after a first crash) plus its start (imports torch) on 2 loaded cores.
BACK_TIMEOUT_S = 120.0
#: The gateway routing to the mesh as it is (a watch interval, an expired lease: seconds).
SETTLED_TIMEOUT_S = 60.0
#: A killed gateway answers again within this (0.5 s backoff plus its start; generous for CI:
#: bench.chaos measures the real figure).
GATEWAY_BACK_S = 45.0
CALLERS = 3


def poll(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def port(address: str) -> str:
    return address.rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running_up(tmp_path_factory.mktemp("chaos")) as up:
        yield up


def settled(up: Up) -> None:
    """Every unit running, and the gateway routing to exactly the live inference units."""

    def whole() -> bool:
        units = up.units()
        if any(unit["state"] != "running" for unit in units.values()):
            return False
        inference = {port(u["address"]) for slug, u in units.items() if slug.startswith("infer")}
        return routed_inference_ports(up.endpoints()["gateway"], up.state) == inference

    poll("the mesh to be whole", whole, SETTLED_TIMEOUT_S)


@dataclass
class Fault:
    before: dict[str, Any]
    after: dict[str, Any]
    load: InferLoad
    struck: float

    def failed(self) -> list[Outcome]:
        return [o for o in self.load.outcomes if o.code is not None]

    def summary(self) -> str:
        failed = self.failed()
        shown = "\n".join(
            f"  +{o.started - self.struck:.2f}s {o.code}: {o.details}" for o in failed
        )
        return f"{len(failed)} of {len(self.load.outcomes)} calls failed:\n{shown[:3000]}"


def under_load(up: Up, slug: str, strike: Callable[[dict[str, Any]], None]) -> Fault:
    """Strikes unit ``slug`` under load; returns once it is back (new pid) and serving."""
    settled(up)
    before = up.units()[slug]
    gateway = up.endpoints()["gateway"]
    with InferLoad(gateway, callers=CALLERS) as load:
        started = time.monotonic()
        poll("the load to get through", lambda: load.succeeded_after(started), 30)
        struck = time.monotonic()
        strike(before)

        def back() -> bool:
            unit = up.units()[slug]
            return bool(unit["state"] == "running" and unit["pid"] != before["pid"])

        poll(f"{slug} to be back", back, BACK_TIMEOUT_S)
        after = up.units()[slug]
        if slug.startswith("inference"):
            poll(
                f"the gateway to route to the new {slug}",
                lambda: port(after["address"]) in routed_inference_ports(gateway, up.state),
                SETTLED_TIMEOUT_S,
            )
        again = time.monotonic()
        poll("a call to succeed after the restart", lambda: load.succeeded_after(again), 30)
    return Fault(before, after, load, struck)


def kill(
    sig: signal.Signals, which: Callable[[dict[str, Any]], int]
) -> Callable[[dict[str, Any]], None]:
    return lambda unit: os.kill(which(unit), sig)


def unit_pid(unit: dict[str, Any]) -> int:
    return int(unit["pid"])


def worker_pid(unit: dict[str, Any]) -> int:
    """The `meshserve worker` child of a `meshserve run` unit."""
    (worker,) = [
        pid for pid in children(int(unit["pid"])) if b"worker" in cmdline(Path(f"/proc/{pid}"))
    ]
    return worker


def restarted(fault: Fault, reason: str | None = "killed by SIGKILL") -> None:
    assert fault.after["restarts"] == fault.before["restarts"] + 1
    if reason is not None:
        assert fault.after["last_exit"] == reason, fault.after


def no_cold_load(mesh: Up, slug: str) -> None:
    """The restarted worker loaded its versions before it reported SERVING (issue 16): no
    call the gateway sent it waited for weights (its log accumulates over restarts)."""
    log = mesh.state / "logs" / f"inference-worker-{slug.rsplit('-', 1)[1]}.log"
    assert COLD_LOAD not in log.read_text(), log


def test_sigkill_of_an_inference_worker_fails_no_request(mesh: Up) -> None:
    fault = under_load(mesh, "inference-1", kill(signal.SIGKILL, worker_pid))
    assert not fault.failed(), fault.summary()
    # The unit (worker and sidecar together) restarted; its exit names its worker's death,
    # as a shell reports a child killed by a signal.
    restarted(fault, reason="exited with status 137 (SIGKILL)")
    no_cold_load(mesh, "inference-1")


def test_sigkill_of_an_inference_sidecar_fails_no_request_and_status_shows_it(
    mesh: Up,
) -> None:
    fault = under_load(mesh, "inference-2", kill(signal.SIGKILL, unit_pid))
    assert not fault.failed(), fault.summary()
    restarted(fault)
    no_cold_load(mesh, "inference-2")
    status = cli("status", "--state-dir", str(mesh.state), "--es", mesh.endpoints()["es_url"])
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if "inference-2" in line)
    assert "running" in row and "killed by SIGKILL" in row and str(fault.after["pid"]) in row


@pytest.mark.parametrize("slug", ["training-1", "data-1", "store"])
def test_sigkill_of_a_training_data_or_store_process_fails_no_inference(
    mesh: Up, slug: str
) -> None:
    fault = under_load(mesh, slug, kill(signal.SIGKILL, unit_pid))
    assert not fault.failed(), fault.summary()
    restarted(fault)
    if slug == "store":
        # Back on the URL everyone was given.
        assert fault.after["address"] == fault.before["address"] == mesh.endpoints()["es_url"]


def test_sigterm_of_an_inference_unit_drains_it_with_no_failed_request(mesh: Up) -> None:
    fault = under_load(mesh, "inference-1", kill(signal.SIGTERM, unit_pid))
    assert not fault.failed(), fault.summary()
    # A unit that stopped when asked is restarted at once, not counted as a failure.
    restarted(fault, reason=None)
    assert fault.after["last_exit"] in ("exited with status 0", "killed by SIGTERM")
    no_cold_load(mesh, "inference-1")


def test_meshserve_restart_is_a_rolling_restart_with_no_failed_request(mesh: Up) -> None:
    result: list[Any] = []
    routed_then: list[set[str]] = []

    def restart(unit: dict[str, Any]) -> None:
        # Waits until the unit is back, as an operator's script would.
        result.append(cli("restart", "inference-2", "--state-dir", str(mesh.state), timeout=150))
        # Back means routed again: a script may restart the next unit at once.
        routed_then.append(routed_inference_ports(mesh.endpoints()["gateway"], mesh.state))

    fault = under_load(mesh, "inference-2", restart)
    (done,) = result
    assert done.returncode == 0, done.stderr
    assert "running again" in done.stdout and "routed by the gateway" in done.stdout
    assert port(fault.after["address"]) in routed_then[0], (fault.after, routed_then)
    assert not fault.failed(), fault.summary()
    restarted(fault, reason=None)
    no_cold_load(mesh, "inference-2")


def test_sigkill_of_the_gateway_brings_it_back_on_its_port(mesh: Up) -> None:
    fault = under_load(mesh, "gateway", kill(signal.SIGKILL, unit_pid))
    restarted(fault)
    assert fault.after["address"] == fault.before["address"]
    # Clients reconnect on their own once it is back: the outage ends within its restart.
    failed = fault.failed()
    if failed:
        outage = max(o.ended for o in failed) - fault.struck
        assert outage < GATEWAY_BACK_S, fault.summary()
    assert fault.load.succeeded_after(max((o.ended for o in failed), default=fault.struck))


def ring_owner_port(mesh: Up, model: str) -> str:
    """The port of the inference endpoint the gateway's ring gives ``model`` now."""
    explained = cli("route", "explain", "--model", model, "--state-dir", str(mesh.state))
    assert explained.returncode == 0, explained.stderr
    line = next(line for line in explained.stdout.splitlines() if line.startswith(" endpoint"))
    return port(line.split()[1])


def test_a_hung_inference_worker_is_routed_around_and_serves_again_once_it_answers(
    mesh: Up,
) -> None:
    """SIGSTOP, a hang rather than a death: the worker's connection and its health stream
    stay open, so only its sidecar's health probe (missed deadlines) can tell. The gateway
    stops routing to it and `status` shows it NOT_SERVING; once resumed it is routed again.
    Only calls already sent to it before that fail (on their deadline), and nothing
    restarts it: the hang is shorter than the liveness window (30 s; test_liveness.py has
    one that outlasts it)."""
    settled(mesh)
    gateway = mesh.endpoints()["gateway"]
    owner = ring_owner_port(mesh, "demo")
    ((slug, unit),) = [(s, u) for s, u in mesh.units().items() if port(u["address"]) == owner]
    worker = worker_pid(unit)
    with InferLoad(gateway, callers=CALLERS) as load:
        started = time.monotonic()
        poll("the load to get through", lambda: load.succeeded_after(started), 30)
        os.kill(worker, signal.SIGSTOP)
        try:
            poll(
                "the gateway to stop routing to the hung worker",
                lambda: owner not in routed_inference_ports(gateway, mesh.state),
                SETTLED_TIMEOUT_S,
            )
            around = time.monotonic()
            poll(
                "a call to succeed around the hung worker", lambda: load.succeeded_after(around), 30
            )
            status = cli("status", "--state-dir", str(mesh.state))
            assert status.returncode == 0, status.stderr
            # The instances table (the units table names 127.0.0.1: its unit runs on).
            row = next(line for line in status.stdout.splitlines() if f"localhost:{owner}" in line)
            assert "NOT_SERVING" in row, status.stdout
        finally:
            os.kill(worker, signal.SIGCONT)
        poll(
            "the gateway to route to the resumed worker",
            lambda: owner in routed_inference_ports(gateway, mesh.state),
            SETTLED_TIMEOUT_S,
        )
        again = time.monotonic()
        poll("a call to succeed after the resume", lambda: load.succeeded_after(again), 30)
    failed = [o for o in load.outcomes if o.code is not None]
    assert all(o.started < around for o in failed), failed
    assert {o.code for o in failed} <= {grpc.StatusCode.DEADLINE_EXCEEDED}, failed
    assert mesh.units()[slug]["pid"] == unit["pid"]
    assert mesh.units()[slug]["restarts"] == unit["restarts"]
