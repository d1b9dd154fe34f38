"""The TrainingService end to end in-process: real data service, real training processes."""

from __future__ import annotations

import asyncio
import json

import grpc
import grpc.aio
import pytest
import torch

from protos.inference import model_config_pb2 as mc
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.model_repo import ModelRepo
from workers.training import export
from workers.training.batches import DataClient, StreamRequest

from .conftest import DataServer, Worker, finished, mlp_spec


async def test_mlp_reaches_90_percent_and_publishes_a_servable_version(
    worker: Worker, data_server: DataServer
) -> None:
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=mlp_spec()))
    assert job.id and job.state == training_pb2.JOB_STATE_QUEUED
    assert job.spec.dataset.version == "1"  # "latest" pinned at submission
    done = await finished(worker.stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.metrics["val_accuracy"] >= 0.9
    assert done.step == done.total_steps > 0
    assert done.published.version == "1"

    repo = ModelRepo(str(worker.model_repo))
    assert repo.list_versions("blobs-mlp") == [1]
    config = repo.read_config("blobs-mlp")
    assert config.platform == "pytorch_libtorch"
    assert [(i.name, list(i.dims), i.data_type) for i in config.input] == [("x", [4], mc.TYPE_FP32)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3])]
    lineage = repo.read_lineage("blobs-mlp", 1)
    assert lineage["job_id"] == job.id
    assert lineage["dataset"]["name"] == "blobs" and lineage["dataset"]["version"] == "1"
    assert lineage["spec"]["optimizer"]["learning_rate"] == 0.02
    assert lineage["metrics"]["val_accuracy"] == done.metrics["val_accuracy"]
    json.dumps(lineage)

    # The published TorchScript computes what the trained module computed: evaluated
    # on the same validation split it gives exactly the accuracy the job measured.
    reply = await worker.stub.Evaluate(
        training_pb2.EvaluateRequest(
            model_name="blobs-mlp", dataset=training_pb2.DatasetRef(name="blobs")
        )
    )
    assert reply.model_version == "1"
    assert reply.num_examples == 160
    assert reply.accuracy == pytest.approx(done.metrics["val_accuracy"], abs=1e-12)
    assert reply.loss == pytest.approx(done.metrics["val_loss"], rel=1e-5)
    assert 0.9 <= reply.f1 <= 1.0 and 0.9 <= reply.precision <= 1.0 and 0.9 <= reply.recall <= 1.0

    # It takes raw (unstandardised) features, as the data service stores them.
    with open(worker.model_repo / "blobs-mlp" / "1" / "model.pt", "rb") as f:
        module = export.load_torchscript(f.read())
    batch = await asyncio.to_thread(first_batch, data_server.address)
    with torch.no_grad():
        logits = module(batch["x"])
    assert logits.shape == (64, 3)
    accuracy = float((logits.argmax(1) == batch["y"]).float().mean())
    assert accuracy >= 0.85

    # Versions of one model share a config: a job that would change its inputs or
    # outputs is refused, and evaluating on a dataset of another shape is too.
    other = mlp_spec()
    other.dataset.name = "line"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=other))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("model_name:")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.Evaluate(
            training_pb2.EvaluateRequest(
                model_name="blobs-mlp", dataset=training_pb2.DatasetRef(name="line")
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def first_batch(address: str) -> dict[str, torch.Tensor]:
    # A blocking client: run it off the event loop that serves the data service.
    client = DataClient(address)
    try:
        return next(client.batches(StreamRequest("blobs", "1", data_pb2.SPLIT_VALIDATION, 64)))
    finally:
        client.close()


@pytest.mark.parametrize(
    ("field", "value", "code", "needle"),
    [
        ("epochs", 0, grpc.StatusCode.INVALID_ARGUMENT, "epochs"),
        ("batch_size", -1, grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        ("model_name", "", grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
    ],
)
async def test_bad_specs_are_rejected_naming_the_field(
    worker: Worker, field: str, value: object, code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=mlp_spec(**{field: value})))
    assert info.value.code() == code
    assert needle in (info.value.details() or "")


async def test_unknown_dataset_and_architecture_misfit(worker: Worker) -> None:
    spec = mlp_spec()
    spec.dataset.name = "nope"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (info.value.details() or "")

    spec = mlp_spec()
    spec.dataset.version = "9"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    spec = mlp_spec()
    spec.architecture.cnn.SetInParent()  # blobs are [4]-vectors, not images
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "architecture.cnn" in (info.value.details() or "")


@pytest.mark.parametrize("job_id", ["missing", ""])
async def test_unknown_job_ids_are_not_found(worker: Worker, job_id: str) -> None:
    """An empty id too (Elasticsearch's store failed it INTERNAL: tests/registry)."""
    for call in (
        worker.stub.GetJob(training_pb2.GetJobRequest(job_id=job_id)),
        worker.stub.CancelJob(training_pb2.CancelJobRequest(job_id=job_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for watched in ("../etc", job_id):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in worker.stub.WatchJob(training_pb2.WatchJobRequest(job_id=watched)):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def upload_sequences(data: DataServer, name: str, count: int = 480) -> None:
    """Sequences of 8 steps x 2 channels; the class is the sign of channel 0's mean."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(count, 8, 2, generator=generator)
    y = (x[:, :, 0].mean(dim=1) > 0).long()
    header = data_pb2.DatasetHeader(
        name=name,
        schema=data_pb2.Schema(
            features=[
                data_pb2.TensorSpec(name="seq", data_type=data_pb2.DATA_TYPE_FP32, shape=[8, 2])
            ],
            labels=[data_pb2.TensorSpec(name="label", data_type=data_pb2.DATA_TYPE_INT64)],
            task=data_pb2.TASK_CLASSIFICATION,
            num_classes=2,
        ),
    )
    chunk = data_pb2.RecordChunk(
        tensors=[
            data_pb2.Tensor(
                name="seq",
                data_type=data_pb2.DATA_TYPE_FP32,
                shape=[count, 8, 2],
                raw_data=x.numpy().astype("<f4").tobytes(),
            ),
            data_pb2.Tensor(
                name="label",
                data_type=data_pb2.DATA_TYPE_INT64,
                shape=[count],
                raw_data=y.numpy().astype("<i8").tobytes(),
            ),
        ]
    )
    requests = [
        data_pb2.CreateDatasetRequest(header=header),
        data_pb2.CreateDatasetRequest(chunk=chunk),
    ]
    await data.stub.CreateDataset(iter(requests))


async def test_transformer_trains_on_uploaded_sequences(
    worker: Worker, data_server: DataServer
) -> None:
    await upload_sequences(data_server, "signs")
    spec = mlp_spec(model_name="signs-transformer", epochs=6, batch_size=32)
    spec.dataset.name = "signs"
    spec.architecture.transformer.CopyFrom(
        training_pb2.TransformerSpec(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32)
    )
    spec.optimizer.kind = training_pb2.OPTIMIZER_KIND_ADAMW
    spec.optimizer.learning_rate = 0.01
    spec.schedule.kind = training_pb2.SCHEDULE_KIND_COSINE
    spec.schedule.warmup_steps = 5
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    done = await finished(worker.stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.metrics["val_accuracy"] >= 0.85
    config = ModelRepo(str(worker.model_repo)).read_config("signs-transformer")
    assert [(i.name, list(i.dims)) for i in config.input] == [("seq", [8, 2])]


async def test_evaluate_unknown_model_or_version_is_not_found(worker: Worker) -> None:
    for model, version in (("nobody", ""), ("nobody", "3")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await worker.stub.Evaluate(
                training_pb2.EvaluateRequest(
                    model_name=model,
                    model_version=version,
                    dataset=training_pb2.DatasetRef(name="blobs"),
                )
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
