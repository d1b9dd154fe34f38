"""The autoscaler's shell in `up`: a scale-down never drains the last SERVING unit."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cli.supervision.elastic import ElasticGroup, LoadFeed, Reading
from cli.supervision.policy import RestartPolicy
from cli.supervision.processes import Component, Running, after
from cli.supervision.supervisor import Supervisor
from mesh.config.autoscale import AutoscaleSettings
from mesh.scaling.autoscaler import Autoscaler, Bounds
from registry.connect import StoreSettings
from registry.instances import Instance, Status

#: No load and no scale-down window: the policy asks for the minimum at once.
AT_ONCE = replace(AutoscaleSettings(), scale_down_stabilization_s=0.0)


class FixedFeed(LoadFeed):
    """The registry as the test sets it (the thread is never started)."""

    def __init__(self) -> None:
        super().__init__(StoreSettings(url="http://127.0.0.1:1"), "inference", lambda: 0.0)
        self.reading: Reading | None = None

    def latest(self) -> Reading | None:
        return self.reading


@pytest.fixture
def feed() -> Iterator[FixedFeed]:
    fixed = FixedFeed()
    yield fixed
    fixed.stop()


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    said: list[str] = []
    running = Supervisor(verbose=0, say=said.append, on_change=lambda: None, policy=RestartPolicy())
    yield running
    for unit in running.units:
        if unit.running is not None:
            unit.running.process.kill()
            unit.running.process.wait()


def adopt(supervisor: Supervisor, number: int, tmp_path: Path) -> None:
    """A running unit: a real process (a retire signals it), at port 4000 + number."""
    component = Component(f"inference worker {number}", ("run", "inference"), after("x"))
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], text=True)
    supervisor.adopt(
        Running(component, process, f"127.0.0.1:{4000 + number}"), tmp_path / f"{number}.log"
    )


def instance(number: int, status: Status) -> Instance:
    return Instance("inference", f"i{number}", f"localhost:{4000 + number}", status=status)


def test_a_scale_down_waits_until_every_running_unit_serves(
    feed: FixedFeed, supervisor: Supervisor, tmp_path: Path
) -> None:
    adopt(supervisor, 1, tmp_path)
    adopt(supervisor, 2, tmp_path)
    group = ElasticGroup(
        kind="inference",
        scaler=Autoscaler(AT_ONCE, Bounds(1, 2)),
        feed=feed,
        supervisor=supervisor,
        make_component=lambda n: Component(f"inference worker {n}", ("run",), after("x")),
        log_of=lambda c: tmp_path / "x.log",
    )
    # Unit 1 was restarted: running (its sidecar is up) but its worker still loads. The
    # idlest-and-newest choice would drain unit 2, the only one serving.
    feed.reading = Reading(1.0, (instance(1, Status.NOT_SERVING), instance(2, Status.SERVING)))
    group.tick()
    assert group.last is not None and group.last.desired == 1
    assert not any(unit.retiring for unit in supervisor.units)

    # Once both serve, one of them drains.
    feed.reading = Reading(2.0, (instance(1, Status.SERVING), instance(2, Status.SERVING)))
    group.tick()
    assert [unit.retiring for unit in supervisor.units].count(True) == 1
