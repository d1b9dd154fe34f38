"""Evaluates a published model version on a dataset split (the Evaluate RPC's core)."""

from __future__ import annotations

import asyncio

import torch

from mesh.errors import InvalidArgument, NotFound
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.model_repo import ModelRepo, RepositoryError
from workers.training import catalogue, export, loop
from workers.training.batches import DataClient
from workers.training.datasets import Datasets


def _resolve_version(repo: ModelRepo, model: str, version: str) -> int:
    versions = repo.list_versions(model)
    if not versions:
        raise NotFound(f"model {model!r} has no published versions")
    if not version:
        return versions[-1]
    if not version.isdigit() or int(version) not in versions:
        raise NotFound(f"model {model!r} has no version {version!r}")
    return int(version)


async def evaluate(
    repo: ModelRepo,
    datasets: Datasets,
    data_address: str,
    request: training_pb2.EvaluateRequest,
) -> training_pb2.EvaluateResponse:
    if not request.model_name:
        raise InvalidArgument("model_name: must be set")
    if not request.dataset.name:
        raise InvalidArgument("dataset.name: must be set")
    split = request.split or data_pb2.SPLIT_VALIDATION
    dataset = await datasets.get(request.dataset.name, request.dataset.version)
    sig = catalogue.signature_of(dataset.schema)

    def run() -> training_pb2.EvaluateResponse:
        version = _resolve_version(repo, request.model_name, request.model_version)
        try:
            config = repo.read_config(request.model_name)
        except RepositoryError as exc:
            raise NotFound(str(exc)) from exc
        inputs = [(i.name, list(i.dims)) for i in config.input]
        outputs = [list(o.dims) for o in config.output]
        if inputs != [(sig.input_name, list(sig.input_shape))] or outputs != [
            list(sig.output_shape)
        ]:
            raise InvalidArgument(
                f"dataset: model {request.model_name!r} takes {inputs} and produces {outputs}; "
                f"dataset {dataset.name!r} has {sig.input_name!r} {list(sig.input_shape)} "
                f"and needs outputs {list(sig.output_shape)}"
            )
        path = f"{repo.version_path(request.model_name, version)}/{export.MODEL_FILE}"
        with repo.fs.open(path, "rb") as f:
            module = export.load_torchscript(f.read())
        client = DataClient(data_address)
        try:
            acc = loop.accumulate(module, client, dataset, split, torch.device("cpu"))
        finally:
            client.close()
        metrics = acc.result()
        return training_pb2.EvaluateResponse(
            model_name=request.model_name,
            model_version=str(version),
            task=dataset.schema.task,
            num_examples=acc.examples,
            loss=metrics.get("loss", 0.0),
            accuracy=metrics.get("accuracy", 0.0),
            precision=metrics.get("precision", 0.0),
            recall=metrics.get("recall", 0.0),
            f1=metrics.get("f1", 0.0),
            mse=metrics.get("mse", 0.0),
        )

    return await asyncio.to_thread(run)
