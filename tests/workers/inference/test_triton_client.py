"""tritonclient.grpc, unmodified and in its own process, against a worker started by the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.workers.inference.conftest import Template

ROOT = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
LISTENING = "inference worker listening on "

INPUTS: dict[str, Any] = {
    "x": [[0.25, -1.0, 2.5, 0.75], [1.0, 0.5, -0.25, 3.0], [0.0, 0.0, 1.25, -2.0]],
    "ids": [[1, 2, 3, 4], [-5, 0, 2**40, 7]],
    "text": ["mesh", "Triton Client"],
}


@pytest.fixture(scope="module")
def worker_address(template_repo: Template) -> Iterator[str]:
    """One worker process for the module, started the way users start it."""
    command = [sys.executable, "-m", "cli.main", "worker", "inference", "--port", "0"]
    command += ["--model-repo", str(template_repo.path), "--device", "cpu", "--poll-interval", "0"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if line.startswith(LISTENING) or not line:
                break
        assert line.startswith(LISTENING), f"worker did not start (exit {process.poll()})"
        yield line[len(LISTENING) :].strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def results(worker_address: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.triton_client", worker_address],
        cwd=ROOT,
        env=ENV,
        input=json.dumps(INPUTS),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def mlp(template_repo: Template, rows: Any) -> list[list[float]]:
    with torch.inference_mode():
        out: list[list[float]] = template_repo.modules["mlp"](torch.tensor(rows)).tolist()
    return out


def test_health_metadata_and_config(results: dict[str, Any]) -> None:
    assert (results["live"], results["ready"], results["model_ready"]) == (True, True, True)
    assert results["ghost_ready"] is False
    metadata = results["metadata"]
    assert metadata["name"] == "mlp" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "3"]}]
    config = results["config"]["config"]
    assert config["name"] == "mlp" and config["max_batch_size"] == 16
    assert config["input"][0]["data_type"] == "TYPE_FP32"


def test_infer_fp32_int64_bytes_equal_a_direct_forward(
    results: dict[str, Any], template_repo: Template
) -> None:
    assert results["fp32"] == mlp(template_repo, INPUTS["x"])
    assert results["fp32_version"] == "1"
    expected = mlp(template_repo, INPUTS["x"])
    assert results["compressed"] == {"gzip": expected, "deflate": expected}
    assert results["header_version"] == "1"


def test_errors_carry_their_status_and_statistics_count_requests(results: dict[str, Any]) -> None:
    status, message = results["ghost_error"]
    assert status == "StatusCode.NOT_FOUND"
    assert "unknown model 'ghost'" in message
    # Read after four calls of three rows each: fp32, two compressed, the pinned one.
    assert results["inference_count"] >= 12
    ids = torch.tensor(INPUTS["ids"])
    assert results["int64_total"] == ids.sum(dim=1, keepdim=True).tolist()
    assert results["int64_doubled"] == (ids * 2).tolist()
    assert results["bytes_length"] == [[len(t)] for t in INPUTS["text"]]
    assert results["bytes_upper"] == [[t.upper()] for t in INPUTS["text"]]


def test_async_and_stream_infer(results: dict[str, Any], template_repo: Template) -> None:
    assert results["async_error"] is None
    assert results["with_parameters"] == mlp(template_repo, INPUTS["x"])
    assert results["async"] == mlp(template_repo, INPUTS["x"])
    expected = {str(i): mlp(template_repo, [row]) for i, row in enumerate(INPUTS["x"])}
    assert results["stream"] == expected
