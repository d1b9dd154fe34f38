"""A training job reads its batches from the data service through sidecars (issue 7).

``meshserve run data`` and ``meshserve run training`` each start a worker beside its
sidecar, both registered in the embedded registry. The training worker knows only its own
sidecar's outbound port: the data worker's address is never given to it, and the spans
both sidecars write show every data call passing through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch

from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from registry.directory import read_live
from registry.schema import Indices
from workers.model_repo import ModelRepo

from .conftest import REPO_ROOT, eventually, finished, mlp_spec

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Unit:
    """``meshserve run KIND``: a worker and its sidecar, one process tree."""

    def __init__(self, kind: str, traces: Path, store: list[str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "run", kind, "--mtls=DISABLE", *store, *args],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MESHSERVE_TRACES": f"file:{traces}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    async def addresses(self) -> tuple[str, str]:
        """(worker address, sidecar inbound address) from the two ready lines."""
        assert self.proc.stdout is not None
        worker = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        assert " listening on " in worker, worker
        sidecar = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        assert sidecar.startswith("sidecar listening on "), sidecar
        # Keep draining the pipe so a chatty worker never blocks on a full one.
        threading.Thread(target=self._drain, daemon=True).start()
        return worker.split(" listening on ")[1].split()[0], sidecar.split()[3]

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by stop()
            for _ in self.proc.stdout:
                pass

    def children(self) -> list[int]:
        found: list[int] = []
        for listing in Path(f"/proc/{self.proc.pid}").glob("task/*/children"):
            found += [int(pid) for pid in listing.read_text().split()]
        return found

    def stop(self) -> None:
        """SIGTERM (the sidecar drains, then the worker stops); SIGKILL whatever is left."""
        workers = self.children() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def units() -> Iterator[list[Unit]]:
    started: list[Unit] = []
    try:
        yield started
    finally:
        for unit in started:
            unit.stop()


def spans(path: Path, service: str) -> list[dict[str, Any]]:
    """Finished spans one process wrote, by its OpenTelemetry service name."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        span = json.loads(line)
        if span["resource"]["attributes"].get("service.name") == service:
            found.append(span)
    return found


def methods(found: list[dict[str, Any]]) -> set[str]:
    return {str(s["attributes"].get("rpc.method")) for s in found}


async def test_a_training_job_reads_batches_through_sidecars(
    tmp_path: Path,
    store_url: str,
    es: AsyncElasticsearch,
    indices: Indices,
    units: list[Unit],
) -> None:
    store = [f"--es={store_url}", f"--prefix={indices.prefix}", "--drain-delay=0.2"]
    data_traces, training_traces = tmp_path / "data.jsonl", tmp_path / "training.jsonl"
    data = Unit("data", data_traces, store, f"--worker-args=--root {tmp_path / 'data'}")
    units.append(data)
    data_worker, data_sidecar = await data.addresses()

    outbound = free_port()
    worker_args = shlex.join(
        [
            *("--artifacts", str(tmp_path / "artifacts")),
            *("--model-repo", str(tmp_path / "models")),
            *("--data", f"127.0.0.1:{outbound}"),  # its own sidecar, nothing else
        ]
    )
    training = Unit(
        "training",
        training_traces,
        store,
        f"--outbound-port={outbound}",
        f"--worker-args={worker_args}",
    )
    units.append(training)
    _, training_sidecar = await training.addresses()
    assert data_worker not in worker_args

    async def both_serving() -> set[str]:
        live = await read_live(es, indices, datetime.now(UTC))
        return {i.service for i in live.instances.values() if i.status == "SERVING"}

    await eventually(both_serving, lambda s: s == {"data", "training"}, timeout=60)

    # The dataset is created through the data worker's sidecar (inbound, plaintext here).
    async with grpc.aio.insecure_channel(data_sidecar) as channel:
        await data_pb2_grpc.DataServiceStub(channel).CreateBuiltinDataset(
            data_pb2.CreateBuiltinDatasetRequest(
                name="blobs",
                seed=7,
                blobs=data_pb2.BlobsSource(
                    num_examples=400, num_classes=3, num_features=4, cluster_std=1.5
                ),
            )
        )

    async with grpc.aio.insecure_channel(training_sidecar) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        spec = mlp_spec(model_name="meshed", epochs=2)

        async def submit() -> training_pb2.Job | None:
            # UNAVAILABLE until the outbound side has discovered the data service.
            try:
                job: training_pb2.Job = await stub.SubmitJob(
                    training_pb2.SubmitJobRequest(spec=spec), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return None
            return job

        job = await eventually(submit, lambda j: j is not None, timeout=30)
        assert job is not None
        done = await finished(stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.step == done.total_steps > 0
    assert ModelRepo(str(tmp_path / "models")).list_versions("meshed") == [1]

    # Both hops saw the data calls: the training sidecar's outbound side and the data
    # worker's sidecar inbound. A training worker that reached the data worker directly
    # would leave neither.
    outbound_spans = spans(training_traces, "sidecar/training")
    inbound_spans = spans(data_traces, "sidecar/data")
    for hop in (outbound_spans, inbound_spans):
        assert {"GetDataset", "StreamBatches"} <= methods(hop)
    streamed = [s for s in inbound_spans if s["attributes"].get("rpc.method") == "StreamBatches"]
    # Every epoch streams the training and validation splits, plus the final evaluation.
    assert len(streamed) >= 2 * spec.epochs
    assert all(s["attributes"].get("rpc.grpc.status_code") == 0 for s in streamed)
