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
from protos.inference import model_config_pb2 as mc
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from registry.catalog import Catalog, Stage
from registry.jobs import ElasticJobClaims, ElasticJobStore
from registry.schema import Indices
from workers.model_repo import ModelRepo
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


async def test_versions_published_before_the_catalog_are_recorded_when_the_worker_starts(
    tmp_path: Path, data_server: DataServer, es: AsyncElasticsearch, indices: Indices
) -> None:
    """A repository trained into without the registry (an older `up`'s state folder):
    its versions join the catalog when a worker on the registry starts; an operator's own
    version (no lineage.json) is left out, and a second start records nothing twice."""
    repo = ModelRepo(str(tmp_path / "models"))
    repo.write_config("older", mc.ModelConfig(name="older", platform="pytorch_libtorch"))
    trained = {"job_id": "job-1", "metrics": {"val_accuracy": 0.5}, "step": 10}
    repo.publish_version("older", {"model.pt": b"weights"}, trained)
    repo.publish_version("older", {"model.pt": b"an operator's own"})
    settings = WorkerSettings(
        artifacts_url=str(tmp_path / "artifacts"),
        model_repo_url=repo.url,
        data_address=data_server.address,
    )
    catalog = Catalog(es, indices)
    store = ElasticJobStore(es, indices)
    for attempt in range(2):
        claims = ElasticJobClaims(es, indices, f"worker-{attempt}", ttl=5)
        async with training_worker(
            settings, ServerSettings(), store, CatalogRecorder(catalog), claims
        ):
            pass
        [entry] = await catalog.list("older")
        assert (entry.version.version, entry.stage) == ("1", Stage.CANDIDATE)
        assert entry.version.artifact_url == repo.version_path("older", 1)
        assert entry.version.lineage["job_id"] == "job-1"
        assert dict(entry.version.metrics) == {"val_accuracy": 0.5}
