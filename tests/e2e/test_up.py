"""`meshserve up` end to end: the whole mesh as subprocesses, the README tour, a Node.js
client, the model catalog, the real grpcurl, a clean stop, a restart.

One module-scoped ``up`` serves the Node.js client, the catalog and grpcurl tests, and then
the tour, which ends it with
Ctrl-C (starting it and training the demo model is most of the cost): the tour stays the
module's last test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cli.admin_credential import own_admin_metadata
from cli.routed import routed_endpoints, unrouted
from gateway.fleet_merge import served_everywhere
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc
from registry.embedded import free_port
from registry.state_dir import UP_FILE
from tests.support.grpcurl import grpcurl
from tests.support.node_client import run_client
from tests.support.up import ENV, ROOT, Up, alive, cli, kill_leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.fixture
def mesh_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    kill_leftovers(state)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """The module's mesh, ready. The tour stops it itself; else it is stopped here."""
    base = tmp_path_factory.mktemp("up")
    running = Up(base / "state", free_port(), base / "up-1.log")
    try:
        running.wait_ready()
        yield running
        if running.process.poll() is None:
            running.interrupt()
            assert running.process.returncode == 0, running.output()[-3000:]
    finally:
        running.kill()
        kill_leftovers(running.state)


def running_gateway(up: Up) -> str:
    if up.process.poll() is not None:
        pytest.fail("the module's up has stopped: the tour (which stops it) must run last")
    return str(up.endpoints()["gateway"])


#: Model inputs (the demo model takes 4 features) and what the Node client uploads.
ROWS = [[0.5, -1.0, 2.0, 0.1], [1.0, 0.0, -0.5, 0.25], [0.0, 0.0, 0.0, 0.0]]
UPLOAD = "node-upload"


def reference_logits(gateway: str) -> list[list[float]]:
    """The demo model's outputs for ROWS, asked through grpc's Python client in typed
    contents: the Node client's raw FP32 bytes must decode to the same numbers."""
    with grpc.insecure_channel(gateway) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(
                model_name="demo",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="x",
                        datatype="FP32",
                        shape=[len(ROWS), 4],
                        contents=pb.InferTensorContents(fp32_contents=[v for r in ROWS for v in r]),
                    )
                ],
            ),
            timeout=30,
        )
    assert reply.outputs[0].shape == [len(ROWS), 3]
    values = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(len(ROWS), 3)
    return [[float(v) for v in row] for row in values]


def test_up_is_ready_once_every_worker_is_routed_and_serves_the_demo_model(up: Up) -> None:
    """Checked at once (this test runs first): up.json's presence is the promise."""
    gateway = running_gateway(up)
    units = {slug: u["address"] for slug, u in up.units().items() if "-" in slug}
    assert sorted(units) == ["data-1", "inference-1", "inference-2", "training-1"]
    routed = routed_endpoints(gateway, own_admin_metadata(up.state))
    assert routed is not None and unrouted(units.values(), routed) == [], (units, routed)
    with grpc.insecure_channel(gateway) as channel:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            pb.RepositoryIndexRequest(), timeout=30
        )
    assert served_everywhere(index, "demo"), index


def test_a_nodejs_client_makes_every_kind_of_call_through_the_gateway(up: Up) -> None:
    gateway = running_gateway(up)
    seen = run_client(
        gateway, {"model": "demo", "rows": ROWS, "dataset": "demo-blobs", "upload": UPLOAD}
    )
    assert seen["load"]["services"] == [
        "inference.GRPCInferenceService",
        "meshserve.data.v1.DataService",
        "meshserve.training.v1.TrainingService",
        "meshserve.mesh.v1.Admin",
    ]
    assert seen["server_live"] == {"live": True}
    assert seen["model_metadata"] == {
        "name": "demo",
        "versions": ["1"],
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
    }
    expected = reference_logits(gateway)
    infer = seen["model_infer"]
    assert infer["model_version"] == "1"
    assert infer["output"]["name"] == "logits" and infer["output"]["shape"] == [len(ROWS), 3]
    assert np.allclose(infer["output"]["data"], expected, rtol=1e-5, atol=1e-6)
    # demo-blobs: 600 examples of 4 FP32 features, in batches of 128.
    assert seen["stream_batches"] == {
        "batches": 5,
        "indexes": [0, 1, 2, 3, 4],
        "examples": 600,
        "first_tensor": {"name": "x", "shape": [128, 4], "bytes": 128 * 4 * 4},
    }
    assert seen["create_dataset"] == {"name": UPLOAD, "version": "1", "examples": 12}
    with grpc.insecure_channel(gateway) as channel:
        stored = data_pb2_grpc.DataServiceStub(channel).GetDataset(
            data_pb2.GetDatasetRequest(name=UPLOAD), timeout=30
        )
    assert stored.num_examples == 12
    streamed = seen["model_stream_infer"]
    assert streamed["errors"] == []
    assert sorted(streamed["outputs"]) == [f"node-{i}" for i in range(len(ROWS))]
    for i, row in enumerate(expected):
        assert np.allclose(streamed["outputs"][f"node-{i}"], row, rtol=1e-5, atol=1e-6)
    # A stream answered once, then held open past its 4 s deadline.
    assert seen["deadline"]["code"] == "DEADLINE_EXCEEDED" and seen["deadline"]["answered"] == 1
    assert seen["deadline"]["elapsed_ms"] >= 3900
    assert seen["cancelled"] == {"code": "CANCELLED", "received": 1}
    ids = seen["request_id"]
    assert ids["returned"] == [ids["sent"]]
    assert len(ids["generated"]) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids["generated"][0])
    assert ids["failed"] == {"code": "NOT_FOUND", "id": [ids["sent"]]}


def test_models_list_shows_what_up_trained_and_the_catalog_commands_work(up: Up) -> None:
    """The training worker under up records what it publishes in the store's catalog."""
    env = {"MESHSERVE_STATE_DIR": str(up.state)}
    running_gateway(up)

    def models(*args: str) -> subprocess.CompletedProcess[str]:
        return cli("models", *args, env=env)

    listed = models("list")
    assert listed.returncode == 0, listed.stderr
    assert "no model versions published" not in listed.stdout
    (row,) = [line for line in listed.stdout.splitlines() if "│ demo " in line]
    assert [cell.strip() for cell in row.split("│")[1:4]] == ["demo", "1", "candidate"], row

    promoted = models("promote", "demo", "1")
    assert promoted.returncode == 0, promoted.stderr
    assert "demo: production is now version 1" in promoted.stdout
    listed = models("list", "--model", "demo")
    assert "production" in listed.stdout, listed.stdout
    # Nothing earlier to go back to: refused in one line, named like a gRPC status.
    rollback = models("rollback", "demo")
    assert rollback.returncode == 1
    assert "FAILED_PRECONDITION" in rollback.stderr and "Traceback" not in rollback.stderr


def test_real_grpcurl_streams_through_the_gateway(up: Up) -> None:
    """grpcurl 1.8.6 itself: list and describe, server streaming (StreamBatches, WatchJob)
    and a bidirectional ModelStreamInfer fed from stdin, through up's gateway."""
    gateway = running_gateway(up)
    listed = grpcurl("-plaintext", gateway, "list")
    assert listed.returncode == 0, listed.stderr
    assert {
        "inference.GRPCInferenceService",
        "meshserve.data.v1.DataService",
        "meshserve.training.v1.TrainingService",
    } <= set(listed.stdout.split()), listed.stdout
    described = grpcurl("-plaintext", gateway, "describe", "meshserve.training.v1.TrainingService")
    assert described.returncode == 0, described.stderr
    assert "rpc WatchJob" in described.stdout

    def call(method: str, request: object, stdin: str | None = None) -> list[dict[str, Any]]:
        data = "@" if stdin is not None else json.dumps(request)
        return grpcurl("-plaintext", "-d", data, gateway, method, stdin=stdin).messages()

    # StreamBatches: both splits of demo-blobs, batch by batch, cover its 600 examples.
    sizes = 0
    for split in ("SPLIT_TRAIN", "SPLIT_VALIDATION"):
        batches = call(
            "meshserve.data.v1.DataService/StreamBatches",
            {"dataset": "demo-blobs", "split": split, "batch_size": 100},
        )
        assert [int(b.get("index", 0)) for b in batches] == list(range(len(batches)))
        sizes += sum(int(b["size"]) for b in batches)
    assert sizes == 600

    # WatchJob: the job that trained demo version 1 when up started, its whole history.
    (listing,) = call(
        "meshserve.training.v1.TrainingService/ListJobs",
        {"model_name": "demo", "state": "JOB_STATE_SUCCEEDED"},
    )
    job = listing["jobs"][-1]  # newest first: up's own is the oldest
    events = call("meshserve.training.v1.TrainingService/WatchJob", {"job_id": job["id"]})
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert {"model_name": "demo", "version": "1"}.items() <= next(
        e["published"] for e in events if "published" in e
    ).items()
    assert events[-1]["state_changed"]["state"] == "JOB_STATE_SUCCEEDED", events[-1]

    # Bidirectional: three requests from stdin, a response for each (as each finishes).
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
    replies = call("inference.GRPCInferenceService/ModelStreamInfer", None, stdin=stdin)
    assert sorted(r["infer_response"]["id"] for r in replies) == ["0", "1", "2"], replies
    assert all(r["infer_response"]["model_name"] == "demo" for r in replies)


def test_the_readme_tour_makes_batch_npy_before_it_infers_on_it(up: Up, tmp_path: Path) -> None:
    gateway = running_gateway(up)
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
        "--address", gateway,
    )  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr
    assert len(json.loads(inferred.stdout)["outputs"]["logits"]) == 8


def test_up_runs_the_tour_stops_cleanly_and_restarts_on_its_state(up: Up) -> None:
    gateway = running_gateway(up)
    mesh_state = up.state
    port = int(gateway.rsplit(":", 1)[1])
    endpoints = up.endpoints()
    try:
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
    again = Up(mesh_state, port, up.log.parent / "up-2.log")
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
