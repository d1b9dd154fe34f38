"""The committed stubs match the .proto sources, and the inference protocol keeps Triton's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos import build
from protos.inference import grpc_service_pb2 as oip
from protos.inference import model_config_pb2 as mc


def test_committed_stubs_are_regenerated(tmp_path: Path) -> None:
    written = build.generate(tmp_path)
    assert written, "protoc generated nothing"
    stale = []
    for fresh in written:
        relative = fresh.relative_to(tmp_path)
        committed = build.ROOT / relative
        if not committed.exists() or build.normalise(committed.read_text()) != build.normalise(
            fresh.read_text()
        ):
            stale.append(str(relative))
    assert not stale, f"stubs out of date, run `make protos`: {stale}"


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (oip.ModelReadyRequest, {"name": 1, "version": 2}),
        (oip.ServerMetadataResponse, {"name": 1, "version": 2, "extensions": 3}),
        (
            oip.ModelMetadataResponse,
            {"name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5},
        ),
        (
            oip.InferParameter,
            {
                "bool_param": 1,
                "int64_param": 2,
                "string_param": 3,
                "double_param": 4,
                "uint64_param": 5,
            },
        ),
        (
            oip.InferTensorContents,
            {
                "bool_contents": 1,
                "int_contents": 2,
                "int64_contents": 3,
                "uint_contents": 4,
                "uint64_contents": 5,
                "fp32_contents": 6,
                "fp64_contents": 7,
                "bytes_contents": 8,
            },
        ),
        (
            oip.ModelInferRequest,
            {
                "model_name": 1,
                "model_version": 2,
                "id": 3,
                "parameters": 4,
                "inputs": 5,
                "outputs": 6,
                "raw_input_contents": 7,
            },
        ),
        (
            oip.ModelInferRequest.InferInputTensor,
            {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5},
        ),
        (
            oip.ModelInferResponse,
            {
                "model_name": 1,
                "model_version": 2,
                "id": 3,
                "parameters": 4,
                "outputs": 5,
                "raw_output_contents": 6,
            },
        ),
        (oip.ModelStreamInferResponse, {"error_message": 1, "infer_response": 2}),
        (oip.ServerLiveResponse, {"live": 1}),
        (oip.ServerReadyResponse, {"ready": 1}),
        (
            oip.RepositoryModelLoadRequest,
            {"repository_name": 1, "model_name": 2, "parameters": 3},
        ),
        (
            oip.SystemSharedMemoryRegisterRequest,
            {"name": 1, "key": 2, "offset": 3, "byte_size": 4},
        ),
        (
            oip.SystemSharedMemoryStatusResponse.RegionStatus,
            {"name": 1, "key": 2, "offset": 3, "byte_size": 4},
        ),
        (oip.SystemSharedMemoryStatusResponse, {"regions": 1}),
        (oip.SystemSharedMemoryUnregisterRequest, {"name": 1}),
        (
            oip.CudaSharedMemoryRegisterRequest,
            {"name": 1, "raw_handle": 2, "device_id": 3, "byte_size": 4},
        ),
        (
            mc.ModelConfig,
            {
                "name": 1,
                "platform": 2,
                "version_policy": 3,
                "max_batch_size": 4,
                "input": 5,
                "output": 6,
                "instance_group": 7,
                "dynamic_batching": 11,
                "backend": 17,
            },
        ),
    ],
)
def test_open_inference_protocol_field_numbers(message: type, fields: dict[str, int]) -> None:
    descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    actual = {name: descriptor.fields_by_name[name].number for name in fields}
    assert actual == fields


def test_inference_service_paths() -> None:
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    }
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
