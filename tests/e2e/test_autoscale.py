"""``meshserve up --autoscale inference=1:3`` end to end: load makes the inference workers
scale up, its end makes them scale down, and not one request fails on the way.

The policy's windows are shortened in the test's routing config (the annotations of the
inference DestinationRule) so the whole cycle fits in about a minute once the mesh is up.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.embedded import free_port
from tests.support.load import InferLoad
from tests.support.up import ROOT, Up, kill_leftovers
from workers.inference.repository import COLD_LOAD

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

#: Knative's windows and the HPA's, shrunk to seconds. Target 1 in flight per worker: on a
#: loaded 2-core machine the gateway and the Python clients, not the tiny demo model, bound
#: the load a worker sees.
FAST_POLICY = """\
    meshserve.io/autoscale-target: "1"
    meshserve.io/autoscale-window: "6s"
    meshserve.io/autoscale-panic-window: "2s"
    meshserve.io/autoscale-scale-down-stabilization: "10s"
"""
SCALE_TIMEOUT_S = 90.0


def fast_config(folder: Path) -> Path:
    """The repository's routing config with the fast policy on the inference rule."""
    shutil.copytree(ROOT / "config", folder)
    inference = folder / "inference.yaml"
    text = inference.read_text()
    anchor = "    meshserve.io/retry-order: ring-successor\n"
    assert anchor in text
    inference.write_text(text.replace(anchor, anchor + FAST_POLICY))
    return folder


def poll(what: str, check: Callable[[], bool], timeout: float = SCALE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def inference_units(up: Up) -> dict[str, dict[str, Any]]:
    return {slug: u for slug, u in up.units().items() if slug.startswith("inference-")}


def running(up: Up) -> int:
    return sum(1 for u in inference_units(up).values() if u["state"] == "running")


def decisions(state: Path) -> list[dict[str, Any]]:
    path = state / "autoscale.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    config = fast_config(tmp_path / "config")
    running_up = Up(
        tmp_path / "state",
        free_port(),
        tmp_path / "up.log",
        extra=("--config", str(config), "--autoscale", "inference=1:3"),
    )
    try:
        running_up.wait_ready()
        yield running_up
    finally:
        if running_up.process.poll() is None:
            running_up.interrupt()
        running_up.kill()
        kill_leftovers(running_up.state)


def test_load_scales_workers_up_and_down_with_no_failed_request(up: Up) -> None:
    gateway = str(up.endpoints()["gateway"])
    assert set(inference_units(up)) == {"inference-1"}  # --autoscale starts at its minimum
    with InferLoad(gateway, callers=1, pause_s=0.05) as light:
        with InferLoad(gateway, callers=12, pause_s=0.0) as heavy:
            poll("three inference workers", lambda: running(up) == 3)
            # Serving, not just started: the registry has all three SERVING, and the
            # gateway's calls reach the new ones (their logs say they served).
            poll(
                "three serving instances in the autoscaler's reading",
                lambda: any(d["serving"] == 3 for d in decisions(up.state)),
            )
        poll("one inference worker again", lambda: len(inference_units(up)) == 1)
        assert light.succeeded_after(time.monotonic() - 5)
    failed = [o for o in heavy.outcomes + light.outcomes if o.code is not None]
    assert not failed, failed[:5]
    assert len(heavy.outcomes) > 100
    record = decisions(up.state)
    assert max(d["desired"] for d in record) == 3
    assert any(d["panic"] for d in record)  # 1 worker to a load of ~12: a burst
    output = up.output()
    assert len(re.findall(r"inference worker \d scaled down", output)) == 2, output[-3000:]
    assert not re.search(r"inference worker \d [^\n]*restarting", output), output[-3000:]
    # The joined workers preloaded the model before they reported ready: no request waited.
    logs = sorted((up.state / "logs").glob("inference-worker-*.log"))
    assert len(logs) == 3
    for log in logs:
        assert COLD_LOAD not in log.read_text(), log
