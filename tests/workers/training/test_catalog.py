"""A worker on the registry keeps its jobs there and records each published version in the
model catalog as a candidate; ``meshserve models list`` shows it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch

from cli.main import main
from mesh.server.app import ServerSettings
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from registry.catalog import Catalog, Stage
from registry.jobs import ElasticJobClaims, ElasticJobStore
from registry.schema import Indices
from workers.training.manager import WorkerSettings
from workers.training.recorder import CatalogRecorder
from workers.training.server import training_worker

from .conftest import DataServer, finished, mlp_spec


async def test_published_versions_land_in_the_catalog(
    tmp_path: Path,
    data_server: DataServer,
    store_url: str,
    es: AsyncElasticsearch,
    indices: Indices,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = WorkerSettings(
        artifacts_url=str(tmp_path / "artifacts"),
        model_repo_url=str(tmp_path / "models"),
        data_address=data_server.address,
    )
    store = ElasticJobStore(es, indices)
    catalog = Catalog(es, indices)
    claims = ElasticJobClaims(es, indices, "worker-1", ttl=5)
    before = datetime.now(UTC)
    async with (
        training_worker(
            settings, ServerSettings(), store, CatalogRecorder(catalog), claims
        ) as running,
        grpc.aio.insecure_channel(running.serving.address) as channel,
    ):
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        job = await stub.SubmitJob(training_pb2.SubmitJobRequest(spec=mlp_spec(epochs=2)))
        done = await finished(stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message

    # The job lives in the registry, finished and unclaimed.
    stored = await store.get(job.id)
    assert stored is not None and stored.state == training_pb2.JOB_STATE_SUCCEEDED
    assert await store.unfinished() == []
    assert await claims.holder(job.id) is None

    [entry] = await catalog.list("blobs-mlp")
    version = entry.version
    assert entry.stage == Stage.CANDIDATE
    assert (version.model, version.version) == ("blobs-mlp", "1")
    assert version.artifact_url == done.published.uri
    assert Path(version.artifact_url, "model.pt").is_file()
    assert before - timedelta(seconds=1) <= version.created_at <= datetime.now(UTC)
    # The store's JSON may round a double by one unit in the last place.
    assert dict(version.metrics) == pytest.approx(dict(done.metrics), rel=1e-12)
    assert version.lineage["job_id"] == job.id
    assert version.lineage["dataset"] == {
        "name": "blobs",
        "version": "1",
        "sha256": version.lineage["dataset"]["sha256"],
    }
    assert version.lineage["spec"]["epochs"] == 2

    monkeypatch.setenv("COLUMNS", "250")  # one table row per version, unwrapped
    code = await asyncio.to_thread(
        main, ["models", "list", "--es", store_url, "--prefix", indices.prefix]
    )
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "blobs-mlp" in line]
    assert len(rows) == 1
    assert "candidate" in rows[0] and done.published.uri in rows[0]
    assert f"val_accuracy={done.metrics['val_accuracy']:.4g}" in rows[0]
