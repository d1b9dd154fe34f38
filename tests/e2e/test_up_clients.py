"""`meshserve up` as its users' tools see it: the model catalog, and the real grpcurl.

One ``up`` for the module (starting it and training the demo model is most of the cost).
The tests run in file order: the catalog test trains demo version 2, whose job the
grpcurl test then watches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.embedded import free_port
from tests.support.grpcurl import grpcurl
from tests.support.up import ROOT, Up, cli, kill_leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@dataclass
class Running:
    up: Up
    gateway: str
    #: What every CLI command needs to find this up (its gateway, store and admin key).
    env: dict[str, str]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("up-clients")
    state = root / "state"
    up = Up(state, free_port(), root / "up.log")
    try:
        endpoints = up.wait_ready()
        yield Running(up, str(endpoints["gateway"]), {"MESHSERVE_STATE_DIR": str(state)})
        up.interrupt()
    finally:
        up.kill()
        kill_leftovers(state)


def test_models_list_promote_and_rollback_work_out_of_the_box(running: Running) -> None:
    def models(*args: str) -> str:
        done = cli("models", *args, env=running.env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # The demo model up trained is in the catalog (the training worker records it).
    listed = models("list")
    assert "no model versions published" not in listed
    assert "demo" in listed and "candidate" in listed, listed

    trained = cli(
        "train", "demo", "--dataset", "demo-blobs", "--epochs", "1", "--address",
        running.gateway, timeout=240, env=running.env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    listed = models("list", "--model", "demo")
    rows = [line.split("│") for line in listed.splitlines() if "demo" in line]
    assert sorted(row[2].strip() for row in rows) == ["1", "2"], listed

    assert "production is now version 1" in models("promote", "demo", "1")
    assert "production is now version 2" in models("promote", "demo", "2")
    assert "production is now version 1" in models("rollback", "demo")
    listed = models("list", "--model", "demo")
    assert "production" in next(line for line in listed.splitlines() if "│ 1 " in line), listed


def test_real_grpcurl_server_streaming_through_the_gateway(running: Running) -> None:
    gateway = ("-plaintext", running.gateway)
    listed = grpcurl(*gateway, "list")
    assert listed.returncode == 0, listed.stderr
    assert {
        "inference.GRPCInferenceService",
        "meshserve.data.v1.DataService",
        "meshserve.training.v1.TrainingService",
    } <= set(listed.stdout.split()), listed.stdout
    described = grpcurl(*gateway, "describe", "meshserve.training.v1.TrainingService")
    assert described.returncode == 0, described.stderr
    assert "rpc WatchJob" in described.stdout

    # StreamBatches: both splits of demo-blobs, batch by batch, cover its 600 examples.
    sizes = 0
    for split in ("SPLIT_TRAIN", "SPLIT_VALIDATION"):
        request = {"dataset": "demo-blobs", "split": split, "batch_size": 100}
        batches = grpcurl(
            "-plaintext",
            "-d",
            json.dumps(request),
            running.gateway,
            "meshserve.data.v1.DataService/StreamBatches",
        ).messages()
        assert len(batches) >= 1
        assert [int(b.get("index", 0)) for b in batches] == list(range(len(batches)))
        sizes += sum(int(b["size"]) for b in batches)
    assert sizes == 600

    # WatchJob: the job that trained version 2 (the test before), its history to the end.
    jobs = (
        grpcurl(
            "-plaintext",
            "-d",
            '{"model_name": "demo"}',
            running.gateway,
            "meshserve.training.v1.TrainingService/ListJobs",
        ).messages()
    )[0]["jobs"]
    assert jobs and jobs[0]["state"] == "JOB_STATE_SUCCEEDED", jobs
    events = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"job_id": jobs[0]["id"]}),
        running.gateway,
        "meshserve.training.v1.TrainingService/WatchJob",
    ).messages()
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert any("published" in e for e in events), events
    assert events[-1]["state_changed"]["state"] == "JOB_STATE_SUCCEEDED", events[-1]


def test_real_grpcurl_bidirectional_stream_from_stdin(running: Running) -> None:
    request = {
        "model_name": "demo",
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 4],
                "contents": {"fp32_contents": [0.5, -1.0, 2.0, 0.1]},
            }
        ],
    }
    stdin = "\n".join(json.dumps({**request, "id": str(i)}) for i in range(3))
    replies = grpcurl(
        "-plaintext",
        "-d",
        "@",
        running.gateway,
        "inference.GRPCInferenceService/ModelStreamInfer",
        stdin=stdin,
    ).messages()
    assert sorted(r["infer_response"]["id"] for r in replies) == ["0", "1", "2"], replies
    assert all(r["infer_response"]["model_name"] == "demo" for r in replies)


def test_the_readme_tour_makes_batch_npy_before_it_infers_on_it(
    running: Running, tmp_path: Path
) -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    uses = next(i for i, line in enumerate(readme) if "--input x=batch.npy" in line)
    makes = next(i for i, line in enumerate(readme) if "np.save('batch.npy'" in line)
    assert makes < uses
    # The README's own line, as a user pastes it (with this venv's python).
    command = readme[makes].replace("python ", f"{sys.executable} ", 1)
    made = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    inferred = cli(
        "infer", "demo", "--input", f"x={tmp_path / 'batch.npy'}", "--json",
        "--address", running.gateway,
    )  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr
    assert len(json.loads(inferred.stdout)["outputs"]["logits"]) == 8
