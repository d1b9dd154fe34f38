"""Through `meshserve up`'s gateway (two inference workers): load failures name their cause,
and a model file replaced in place is served after the poll interval, with no failed request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from registry.embedded import free_port
from tests.support.processes import Launched
from tests.support.up import ENV, ROOT, Up, kill_leftovers
from workers.inference import testing

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

X = [[0.25, -1.0, 2.5, 0.75], [1.0, 0.5, -0.25, 3.0]]


@pytest.fixture
def mesh_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    kill_leftovers(state)


def forward(module: torch.nn.Module) -> list[list[float]]:
    with torch.inference_mode():
        out: list[list[float]] = module(torch.tensor(X)).tolist()
    return out


def test_load_causes_and_in_place_reloads_through_the_gateway(
    mesh_state: Path, tmp_path: Path
) -> None:
    up = Up(mesh_state, free_port(), tmp_path / "up.log")
    try:
        gateway = str(up.wait_ready()["gateway"])
        models = str(mesh_state / "models")
        warmfail = testing.model_config(
            "warmfail", [("x", testing.FP32, [2])], [("y", testing.FP32, [2])]
        )
        testing.publish(models, warmfail, testing.FailsWarmUp())
        old, new = testing.seeded(testing.MLP(), 1), testing.seeded(testing.MLP(), 2)
        testing.publish(models, testing.mlp_config("swap"), old)

        done = subprocess.run(
            [sys.executable, "-m", "tests.support.triton_extensions", gateway, "cause"],
            cwd=ROOT,
            env=ENV,
            input=json.dumps({"model": "warmfail", "reason": "load failed", "deadline_s": 60}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout)
        # The gateway answers for the fleet: each of up's two workers names the cause.
        ((state, reason),) = [(r["state"], r["reason"]) for r in seen["index"]]
        assert state == "UNAVAILABLE"
        parts = reason.split("; ")
        assert len(parts) == 2, reason
        assert all(p.endswith(": UNAVAILABLE: load failed: RuntimeError: stoll") for p in parts)
        assert seen["load"]["status"] == "StatusCode.UNAVAILABLE"
        assert (
            seen["load"]["message"].count(
                "model 'warmfail' failed to load (version 1: load failed: RuntimeError: stoll)"
            )
            == 2
        ), seen["load"]["message"]

        args = json.dumps({"model": "swap", "x": X, "deadline_s": 90, "settle": 20})
        client = Launched("tests.support.triton_extensions", gateway, "swap", args, name="client")
        try:
            client.wait_for(lambda line: line == "serving", timeout=120)
            path = mesh_state / "models" / "swap" / "1" / "model.pt"
            staged = path.with_name(".model.pt.staged")
            staged.write_bytes(testing.torchscript_bytes(new))
            os.replace(staged, path)
            line = client.wait_for(lambda text: text.startswith("{"), timeout=120)
        finally:
            client.stop()
        results = json.loads(line)
        assert results["before"] == forward(old)
        assert results["after"] == forward(new)
        assert results["errors"] == [] and results["requests"] > 0
        up.interrupt()
    finally:
        up.kill()
