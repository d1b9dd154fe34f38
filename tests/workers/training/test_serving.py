"""Across services: data service → TrainingService → model repository → inference worker.

A model trained through the TrainingService on a data-service dataset is published, and an
inference worker serves that version with exactly the outputs of the published TorchScript
and, on the validation split, exactly the accuracy the job measured at the end of training.
"""

from __future__ import annotations

import asyncio

import grpc.aio
import numpy as np
import torch

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.inference.server import WorkerSettings as InferenceSettings
from workers.inference.server import run_worker
from workers.training import export
from workers.training.batches import DataClient, StreamRequest

from .conftest import DataServer, Worker, eventually, finished, mlp_spec


def validation_split(address: str) -> dict[str, torch.Tensor]:
    """The whole validation split as one batch (a blocking client, run off the loop)."""
    client = DataClient(address)
    try:
        request = StreamRequest("blobs", "1", data_pb2.SPLIT_VALIDATION, 10_000)
        return next(client.batches(request))
    finally:
        client.close()


async def test_the_inference_worker_serves_the_trained_version(
    worker: Worker, data_server: DataServer
) -> None:
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=mlp_spec()))
    done = await finished(worker.stub, job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.message
    assert done.published.version == "1"

    split = await asyncio.to_thread(validation_split, data_server.address)
    x, y = split["x"], split["y"]
    assert x.dtype == torch.float32 and x.shape == (160, 4)
    with open(worker.model_repo / "blobs-mlp" / "1" / "model.pt", "rb") as f:
        scripted = export.load_torchscript(f.read())
    with torch.no_grad():
        expected = scripted(x)

    settings = InferenceSettings(model_repo=str(worker.model_repo), device="cpu")
    async with (
        run_worker(settings) as inference,
        grpc.aio.insecure_channel(inference.serving.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def ready() -> bool:
            reply = await stub.ModelReady(pb.ModelReadyRequest(name="blobs-mlp", version="1"))
            return bool(reply.ready)

        await eventually(ready, bool)
        request = pb.ModelInferRequest(
            model_name="blobs-mlp",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[160, 4])
            ],
            raw_input_contents=[x.numpy().astype("<f4").tobytes()],
        )
        reply = await stub.ModelInfer(request)

    assert reply.model_version == "1"  # the newest version, the one the job published
    [output] = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [160, 3])
    served = torch.from_numpy(
        np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(160, 3).copy()
    )
    # Same network, same inputs, same CPU kernels: the served logits are the TorchScript's.
    assert torch.equal(served, expected)
    # ... and they classify the validation split exactly as the trained module did when the
    # job measured it at the end of training.
    served_accuracy = float((served.argmax(1) == y).double().mean())
    assert served_accuracy == done.metrics["val_accuracy"] >= 0.9
