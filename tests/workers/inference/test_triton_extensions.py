"""Triton's model control and system shared memory, with tritonclient in its own process.

One worker process (started by the CLI, polling its repository) serves a copy of the
test repository plus a model whose warm-up raises.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.processes import ENV, REPO, Launched
from tests.workers.inference.conftest import Template
from workers.inference import testing

X = [[0.25, -1.0, 2.5, 0.75], [1.0, 0.5, -0.25, 3.0]]
IDS = [[1, 2, 3, 4], [-5, 0, 2**40, 7]]


@pytest.fixture(scope="module")
def repo(template_repo: Template, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("extensions") / "repo"
    shutil.copytree(template_repo.path, path)
    config = testing.model_config(
        "warmfail", [("x", testing.FP32, [2])], [("y", testing.FP32, [2])]
    )
    testing.publish(str(path), config, testing.FailsWarmUp())
    testing.publish(str(path), testing.mlp_config("swap"), template_repo.modules["mlp"])
    return path


@pytest.fixture(scope="module")
def worker(repo: Path) -> Iterator[str]:
    launched = Launched(
        "cli.main",
        *("worker", "inference", "--port", "0", "--model-repo", str(repo)),
        *("--device", "cpu", "--poll-interval", "0.2"),
        name="inference worker",
    )
    try:
        yield launched.address("inference worker", timeout=90)
    finally:
        launched.stop()


def drive(address: str, scenario: str, args: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.triton_extensions", address, scenario],
        cwd=REPO,
        env=ENV,
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def forward(module: torch.nn.Module, rows: Any) -> list[list[float]]:
    with torch.inference_mode():
        out: list[list[float]] = module(torch.tensor(rows)).tolist()
    return out


def test_load_failures_name_their_cause_and_config_overrides_load(
    worker: str, template_repo: Template
) -> None:
    override = {
        "name": "mlp",
        "platform": "pytorch_libtorch",
        "max_batch_size": 4,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}],
    }
    results = drive(worker, "control", {"config": json.dumps(override), "x": X})
    assert results["warm_up_failure"] == {
        "status": "StatusCode.UNAVAILABLE",
        "message": "model 'warmfail' failed to load (version 1: load failed: RuntimeError: stoll)",
    }
    assert results["index"]["warmfail"] == ["UNAVAILABLE", "load failed: RuntimeError: stoll"]
    assert results["override"] is None
    assert results["override_config"]["max_batch_size"] == 4
    assert "dynamic_batching" not in results["override_config"]
    assert results["override_y"] == forward(template_repo.modules["mlp"], X)
    assert results["files"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "load parameter(s) file:1/model.pt: model files in a load request are not "
        "supported; publish the version to the model repository and load it by name",
    }
    assert results["bad_config"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert results["bad_config"]["message"].startswith(
        "load parameter 'config' is not a valid JSON model config"
    )
    assert results["reload"] is None
    assert results["reloaded_config"]["max_batch_size"] == 16


def test_a_model_file_replaced_in_place_is_served_without_failed_requests(
    worker: str, repo: Path, template_repo: Template
) -> None:
    old, new = template_repo.modules["mlp"], testing.seeded(testing.MLP(), 7)
    args = json.dumps({"model": "swap", "x": X, "deadline_s": 60})
    client = Launched("tests.support.triton_extensions", worker, "swap", args, name="tritonclient")
    try:
        client.wait_for(lambda line: line == "serving", timeout=90)
        path = repo / "swap" / "1" / "model.pt"
        # As a deploy would: the new file is written aside, then renamed over the old one.
        staged = path.with_name(".model.pt.staged")
        staged.write_bytes(testing.torchscript_bytes(new))
        os.replace(staged, path)
        line = client.wait_for(lambda text: text.startswith("{"), timeout=90)
    finally:
        client.stop()
    results = json.loads(line)
    assert results["before"] == forward(old, X)
    assert results["after"] == forward(new, X)
    assert results["errors"] == [] and results["requests"] > 0


def test_system_shared_memory_round_trip_with_tritonclients_helpers(
    worker: str, template_repo: Template
) -> None:
    key = f"meshserve_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    results = drive(worker, "shm", {"key_prefix": key, "ids": IDS, "x": X})
    regions = results["status"]["regions"]
    assert regions["inputs"] == {
        "name": "inputs",
        "key": f"/{key}_in",
        "byte_size": str(len(IDS) * 4 * 8 + len(X) * 4 * 4),
    }
    assert regions["outputs"]["byte_size"] == "4096"
    ids = torch.tensor(IDS)
    # "total" went to shared memory: its raw_output_contents entry is empty, as Triton's.
    assert results["raw_sizes"] == [0, ids.numel() * 8]
    assert results["total"] == ids.sum(dim=1, keepdim=True).tolist()
    assert results["doubled"] == (ids * 2).tolist()
    assert results["y"] == forward(template_repo.modules["mlp"], X)

    assert results["duplicate"] == {
        "status": "StatusCode.ALREADY_EXISTS",
        "message": "shared memory region 'inputs' is already registered",
    }
    assert results["missing_key"] == {
        "status": "StatusCode.NOT_FOUND",
        "message": f"shared memory region 'ghost': key '/{key}_missing' does not exist on "
        "this host",
    }
    assert results["too_big"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": f"shared memory region 'big': 8192 bytes at offset 0 exceed key "
        f"'/{key}_out' (4096 bytes)",
    }
    assert results["unknown_region"] == {
        "status": "StatusCode.FAILED_PRECONDITION",
        "message": "input 'x': shared memory region 'nowhere' is not registered on this worker",
    }
    assert results["out_of_bounds"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "input 'x': 32 bytes at offset 68 do not fit in shared memory region "
        "'inputs' (96 bytes)",
    }
    assert results["output_too_small"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "output 'y': shared memory byte size 4 is too small for the result (24 bytes)",
    }
    assert results["cuda"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert "cudaIpcOpenMemHandle" in results["cuda"]["message"]

    assert set(results["after_unregister"]["regions"]) == {"outputs"}
    assert results["gone"] == {
        "status": "StatusCode.NOT_FOUND",
        "message": "shared memory region 'inputs' is not registered",
    }
    assert results["unregister_again"] is None
    assert results["after_unregister_all"] == {}
