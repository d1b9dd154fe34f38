"""`meshserve up` end to end: the whole mesh as subprocesses, the README tour, a clean stop, a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.endpoints import UP_FILE
from registry.embedded import free_port
from tests.support.up import ENV, ROOT, Up, alive, cli, kill_leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.fixture
def mesh_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    kill_leftovers(state)


def test_up_runs_the_tour_stops_cleanly_and_restarts_on_its_state(
    mesh_state: Path, tmp_path: Path
) -> None:
    port = free_port()
    up = Up(mesh_state, port, tmp_path / "up-1.log")
    try:
        endpoints = up.wait_ready()
        gateway = str(endpoints["gateway"])
        assert gateway == f"127.0.0.1:{port}"
        output = up.output()
        assert "demo version 1" in output, output  # the first up trained the demo model
        assert (mesh_state / "certs" / "ca.pem").exists()

        # The tour, through the CLI and the gateway.
        infer = cli(
            "infer", "demo", "-d", "[[0.5, -1.0, 2.0, 0.1]]", "--json", "--address", gateway
        )
        assert infer.returncode == 0, infer.stderr
        reply = json.loads(infer.stdout)
        assert reply["model_version"] == "1"
        assert len(reply["outputs"]["logits"]) == 1 and len(reply["outputs"]["logits"][0]) == 3

        bad = cli("infer", "demo", "-d", "[[1, 2]]", "--address", gateway)
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr and "Traceback" not in bad.stderr

        datasets = cli("datasets", "list", "--address", gateway)
        assert datasets.returncode == 0, datasets.stderr
        assert "demo-blobs" in datasets.stdout

        status = cli("status", "--es", str(endpoints["es_url"]))
        assert status.returncode == 0, status.stderr
        for service in ("inference", "training", "data"):
            assert service in status.stdout

        called = cli(
            "call",
            "inference.GRPCInferenceService/ModelMetadata",
            "-d",
            '{"name": "demo"}',
            "--address",
            gateway,
        )
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["inputs"][0]["name"] == "x"

        # The README's apply: the CLI sends the admin key up wrote in its state folder
        # (a dry run: the canary's version 2 does not exist in this tour).
        admin_env = {"MESHSERVE_STATE_DIR": str(mesh_state), "MESHSERVE_ADMIN_KEY": ""}
        canary = "config/examples/canary-90-10.yaml"
        dry = cli("apply", "--dry-run", "-f", canary, "--gateway", gateway, env=admin_env)
        assert dry.returncode == 0 and "routing would change" in dry.stdout, dry.stderr

        triton = subprocess.run(
            [sys.executable, "-m", "tests.e2e.triton_tour", gateway, "demo"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert triton.returncode == 0, triton.stderr
        seen = json.loads(triton.stdout)
        assert seen["live"] and seen["model_ready"]
        assert seen["version"] == "1"
        assert len(seen["output"]) == 2 and len(seen["output"][0]) == 3

        # Ctrl-C: everything stops, nothing is left.
        spawned = up.interrupt()
        assert up.process.returncode == 0, up.output()
        assert len(spawned) >= 6  # store, 4 worker units, gateway, plus their children
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in spawned if alive(pid)]
        assert not (mesh_state / UP_FILE).exists()
    finally:
        up.kill()

    # A second up finds the dataset and model it left: no new dataset, no training.
    again = Up(mesh_state, port, tmp_path / "up-2.log")
    try:
        again.wait_ready()
        output = again.output()
        assert "created dataset" not in output and "training demo" not in output, output
        assert sorted(
            p.name for p in (mesh_state / "models" / "demo").iterdir() if p.name.isdigit()
        ) == ["1"]
        infer = cli(
            "infer", "demo", "-d", "[[0.5, -1.0, 2.0, 0.1]]", "--json", "--address", gateway
        )
        assert infer.returncode == 0, infer.stderr
        assert json.loads(infer.stdout)["model_version"] == "1"
        again.interrupt()
        assert again.process.returncode == 0, again.output()
    finally:
        again.kill()
