"""Publishes a finished job's export into the model repository and records the version.

``VersionRecorder`` is the seam for the registry's model catalog: the worker
calls it after the version directory is in place. Until the catalog is wired in,
``LineageOnly`` records nothing beyond the version's own ``lineage.json``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from google.protobuf import json_format

from mesh.errors import InvalidArgument
from protos.inference import model_config_pb2 as mc
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.model_repo import ModelRepo, RepositoryError
from workers.training import catalogue, export

log = logging.getLogger(__name__)


class VersionRecorder(Protocol):
    """Records a published version (with its metrics and lineage) in a catalog."""

    async def record(
        self, model: str, version: int, uri: str, lineage: Mapping[str, Any]
    ) -> None: ...


class LineageOnly:
    """The default recorder: ``lineage.json`` in the version directory is the record."""

    async def record(self, model: str, version: int, uri: str, lineage: Mapping[str, Any]) -> None:
        log.info("published %s version %d at %s", model, version, uri)


def lineage(
    job: training_pb2.Job, dataset: data_pb2.Dataset, metrics: Mapping[str, float]
) -> dict[str, Any]:
    """What produced a version: the job, the exact dataset version, hyper-parameters, metrics."""
    return {
        "job_id": job.id,
        "dataset": {"name": dataset.name, "version": dataset.version, "sha256": dataset.sha256},
        "spec": json_format.MessageToDict(job.spec, preserving_proto_field_name=True),
        "metrics": dict(metrics),
        "step": job.step,
    }


def _io(config: mc.ModelConfig) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    return (
        [(i.name, list(i.dims)) for i in config.input],
        [(o.name, list(o.dims)) for o in config.output],
    )


def check_compatible(repo: ModelRepo, model: str, sig: catalogue.Signature) -> None:
    """Every version of a model shares one config: a job must keep its inputs and outputs."""
    if model not in repo.list_models():
        return
    try:
        existing = repo.read_config(model)
    except RepositoryError:
        return  # an unreadable config is replaced on publish
    have = _io(existing)
    want = _io(export.model_config(model, sig))
    if have != want:
        raise InvalidArgument(
            f"model_name: model {model!r} already serves inputs {have[0]} and outputs "
            f"{have[1]}; this job would produce {want[0]} and {want[1]}; choose another name"
        )


def find_published(repo: ModelRepo, model: str, job_id: str) -> int | None:
    """The version a job already published (a crash between publish and bookkeeping)."""
    for version in reversed(repo.list_versions(model)):
        if repo.read_lineage(model, version).get("job_id") == job_id:
            return version
    return None


def publish(
    repo: ModelRepo,
    job: training_pb2.Job,
    dataset: data_pb2.Dataset,
    model_file: bytes,
    record: Mapping[str, Any],
) -> training_pb2.PublishedVersion:
    """Writes the next version (temporary name, then rename), and config.pbtxt if new.

    ``record`` (see ``lineage``) becomes the version's lineage.json. A job that
    already published (the worker died before noting it) gets its version back.
    """
    model = job.spec.model_name
    version = find_published(repo, model, job.id)
    if version is None:
        # An existing config is the operator's: its inputs and outputs were checked
        # at submit time, and rewriting it would drop their version policy and
        # batching settings. Only a new (or unreadable) model gets ours.
        try:
            repo.read_config(model)
        except RepositoryError:
            sig = catalogue.signature_of(dataset.schema)
            repo.write_config(model, export.model_config(model, sig))
        version = repo.publish_version(model, {export.MODEL_FILE: model_file}, record)
    uri = repo.version_path(model, version)
    return training_pb2.PublishedVersion(model_name=model, version=str(version), uri=uri)


async def record_published(repo: ModelRepo, recorder: VersionRecorder) -> int:
    """Records every version training published into ``repo`` (those with a lineage.json)
    with ``recorder``; returns how many it found.

    A catalog joined late would otherwise list none of the versions the mesh serves: a
    repository trained into before its worker recorded into the registry (the state folder
    of an older ``meshserve up``, whose training worker ran without the store). Recording
    is idempotent (the catalog keeps a version once), so every start may do it.
    """

    def found() -> list[tuple[str, int, str, dict[str, Any]]]:
        versions = []
        for model in repo.list_models():
            for version in repo.list_versions(model):
                record = repo.read_lineage(model, version)
                if record:  # else not training's: an operator's own model file
                    versions.append((model, version, repo.version_path(model, version), record))
        return versions

    versions = await asyncio.to_thread(found)
    for model, version, uri, record in versions:
        await recorder.record(model, version, uri, record)
    return len(versions)
