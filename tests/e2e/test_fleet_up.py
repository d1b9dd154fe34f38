"""Through `meshserve up`'s gateway with two inference workers, the fleet answers as one
Triton server (tritonclient's model control, index and statistics), and the README's
canary touches only the model it names.

One `up` serves the module: a second model, Triton's `simple`, is written into its model
repository before it starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.embedded import free_port
from tests.support.simple_model import publish_simple
from tests.support.up import ENV, ROOT, Up, cli, kill_leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def triton(gateway: str, *args: str) -> dict[str, Any]:
    """A step of tests/e2e/triton_fleet.py (tritonclient in its own process)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.e2e.triton_fleet", gateway, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout)
    return seen


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, str]]:
    root = tmp_path_factory.mktemp("fleet-up")
    state = root / "state"
    publish_simple(str(state / "models"))
    running = Up(state, free_port(), root / "up.log")
    try:
        gateway = str(running.wait_ready()["gateway"])
        yield running, gateway
        running.interrupt()
    finally:
        running.kill()
        kill_leftovers(state)


def served(gateway: str, up: Up) -> str:
    result = cli("models", "served", "--gateway", gateway, "--state-dir", str(up.state))
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_served_everywhere(gateway: str, up: Up) -> None:
    """Until every worker serves simple (READY with no worker named as not ready)."""
    deadline = time.monotonic() + 60
    while True:
        lines = [line for line in served(gateway, up).splitlines() if "simple" in line]
        cells = [[c.strip() for c in line.split("│")[1:6]] for line in lines]
        if cells and all(c[2] == "READY" and not c[4] for c in cells):
            return
        assert time.monotonic() < deadline, f"simple never served everywhere: {cells}"
        time.sleep(0.5)


def test_unload_and_load_reach_both_workers_with_a_merged_index(up: tuple[Up, str]) -> None:
    running, gateway = up
    workers = [u for slug, u in running.units().items() if slug.startswith("inference")]
    assert len(workers) == 2
    wait_served_everywhere(gateway, running)

    unloaded = triton(gateway, "unload")
    assert unloaded["ready"] is False
    # No replica serves it: every inference fails, whichever worker it reaches.
    assert all(isinstance(outcome, str) and "unloaded" in outcome for outcome in unloaded["infer"])
    (row,) = [m for m in unloaded["index"] if m["name"] == "simple"]
    assert row["state"] == "UNAVAILABLE"
    # The reason names both workers (by their sidecars' addresses), each "unloaded".
    assert row["reason"].count(": UNAVAILABLE: unloaded") == 2, row

    loaded = triton(gateway, "load")
    assert loaded["ready"] is True
    assert loaded["infer"] == [[1, 2, 3]] * 3
    (row,) = [m for m in loaded["index"] if m["name"] == "simple"]
    assert (row["version"], row["state"]) == ("1", "READY")
    assert not row.get("reason")  # ready on both: no worker is named as not ready
    # The CLI shows the same merged view.
    wait_served_everywhere(gateway, running)
    status = cli("status", "--state-dir", str(running.state))
    assert status.returncode == 0, status.stderr
    assert "served models" in status.stdout and "simple" in status.stdout


def test_statistics_are_summed_over_the_workers(up: tuple[Up, str]) -> None:
    _, gateway = up
    seen = triton(gateway, "infer", "64")
    assert seen["failures"] == []
    # Every answer counts every worker's inferences: the same total each time.
    assert seen["after"] == [seen["before"] + 64] * 3


def test_system_shared_memory_round_trip_through_the_gateway(up: tuple[Up, str]) -> None:
    _, gateway = up
    key = f"meshserve-fleet-{uuid.uuid4().hex[:8]}"
    seen = triton(gateway, f"shm:{key}", "8")
    # Registered on both workers (each inference may land on either), listed once.
    assert seen["status"] == ["input_data", "output_data"]
    assert seen["results"] == [[[2, 3, 4], [-2, -1, 0]]] * 8
    assert not seen["after"]


def test_the_readme_canary_leaves_another_model_alone(up: tuple[Up, str]) -> None:
    running, gateway = up
    admin_env = {"MESHSERVE_STATE_DIR": str(running.state), "MESHSERVE_ADMIN_KEY": ""}
    applied = cli(
        "apply", "-f", "config/examples/canary-90-10.yaml", "--gateway", gateway, env=admin_env
    )
    assert applied.returncode == 0, applied.stderr
    try:
        # simple has only version 1: a canary that set x-model-version: 2 on its calls too
        # would fail about one in ten of them with NOT_FOUND.
        seen = triton(gateway, "infer", "200")
        assert seen["failures"] == []
        assert seen["after"][0] == seen["before"] + 200
        explained = cli("route", "explain", "--model", "demo", "--gateway", gateway, env=admin_env)
        assert explained.returncode == 0, explained.stderr
        assert "(canary)" in explained.stdout
    finally:
        # The README's undo.
        rolled = cli("config", "rollback", "--gateway", gateway, env=admin_env)
        assert rolled.returncode == 0, rolled.stderr
    dump = cli("config", "dump", "--gateway", gateway, env=admin_env)
    assert dump.returncode == 0 and "name: canary" not in dump.stdout


def test_models_served_lists_both_models(up: tuple[Up, str]) -> None:
    running, gateway = up
    text = served(gateway, running)
    assert "demo" in text and "simple" in text
    assert Path(running.state / "models" / "simple" / "1" / "model.pt").exists()
