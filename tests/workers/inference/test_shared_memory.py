"""System shared memory: the registry's checks, and requests over a real worker's gRPC port."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from protos.inference import grpc_service_pb2 as pb
from tests.workers.inference.conftest import Client, Template, worker_client
from tests.workers.inference.test_service import infer_request, output, status_of
from workers.inference.shared_memory import RegionStatus, SharedMemoryRegistry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SharedMemoryRegistry]:
    shared = SharedMemoryRegistry(root=str(tmp_path), max_regions=3)
    try:
        yield shared
    finally:
        shared.close()


def shm_file(root: Path, name: str, size: int) -> Path:
    path = root / name
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    return path


def shared_input(
    request: pb.ModelInferRequest, index: int, region: str, size: int, offset: int | None = None
) -> None:
    parameters = request.inputs[index].parameters
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = size
    if offset is not None:
        parameters["shared_memory_offset"].int64_param = offset


def test_register_status_unregister(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    shm_file(tmp_path, "data", 10_000)
    registry.register("a", "/data", 5000, 100)  # an offset past one page: mapped aligned
    registry.register("b", "data", 0, 10_000)
    assert registry.status() == [
        RegionStatus("a", "/data", 5000, 100),
        RegionStatus("b", "data", 0, 10_000),
    ]
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="UINT8", shape=[3])
    shared_input(request, 0, "a", 3, offset=2)
    planned = registry.plan(request)
    assert planned is not None
    assert list(planned.request.raw_input_contents) == [bytes([5002 % 256, 5003 % 256, 5004 % 256])]
    assert not planned.request.inputs[0].parameters  # read in: the decoder sees a raw input
    with pytest.raises(AlreadyExists, match=r"^shared memory region 'a' is already registered$"):
        registry.register("a", "/data", 0, 1)
    registry.unregister("a")
    registry.unregister("a")  # idempotent, as Triton's
    with pytest.raises(NotFound, match=r"^shared memory region 'a' is not registered$"):
        registry.status("a")
    with pytest.raises(FailedPrecondition, match=r"^input 'x': shared memory region 'a' is not"):
        registry.plan(request)
    registry.unregister()
    assert registry.status() == []


def test_registration_is_validated(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    shm_file(tmp_path, "data", 100)
    (tmp_path / "sub").mkdir()
    shm_file(tmp_path / "sub", "x", 100)
    for key in ("/../data", "/sub/x", "/", "", "/.."):
        with pytest.raises(InvalidArgument, match="is not a POSIX shared memory name"):
            registry.register("r", key, 0, 10)
    with pytest.raises(NotFound, match=r"^shared memory region 'r': key '/nope' does not exist"):
        registry.register("r", "/nope", 0, 10)
    with pytest.raises(InvalidArgument, match=r"10 bytes at offset 95 exceed key '/data' \(100"):
        registry.register("r", "/data", 95, 10)
    with pytest.raises(InvalidArgument, match="byte_size must be > 0"):
        registry.register("r", "/data", 0, 0)
    with pytest.raises(InvalidArgument, match="needs a name"):
        registry.register("", "/data", 0, 10)
    os.symlink(tmp_path / "data", tmp_path / "link")
    with pytest.raises(FailedPrecondition, match="cannot open key '/link'"):
        registry.register("r", "/link", 0, 10)  # no following links out of the shm folder
    for name in ("r1", "r2", "r3"):
        registry.register(name, "/data", 0, 10)
    with pytest.raises(ResourceExhausted, match="3 shared memory regions are registered"):
        registry.register("r4", "/data", 0, 10)


def test_request_parameters_are_checked_as_triton_does(
    registry: SharedMemoryRegistry, tmp_path: Path
) -> None:
    shm_file(tmp_path, "data", 64)
    registry.register("r", "/data", 0, 64)
    plain = infer_request("m", {"x": torch.zeros(2)})
    assert registry.plan(plain) is None  # no region named: the request passes untouched

    def planned(edit: object) -> None:
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="x", datatype="FP32", shape=[2])
        edit(request)  # type: ignore[operator]
        registry.plan(request)

    def offset_alone(r: pb.ModelInferRequest) -> None:
        r.inputs[0].parameters["shared_memory_offset"].int64_param = 0

    def string_size(r: pb.ModelInferRequest) -> None:
        shared_input(r, 0, "r", 8)
        r.inputs[0].parameters["shared_memory_byte_size"].string_param = "8"

    def no_size(r: pb.ModelInferRequest) -> None:
        r.inputs[0].parameters["shared_memory_region"].string_param = "r"

    def negative(r: pb.ModelInferRequest) -> None:
        shared_input(r, 0, "r", 8, offset=-8)

    def beyond(r: pb.ModelInferRequest) -> None:
        shared_input(r, 0, "r", 8, offset=60)

    def with_contents(r: pb.ModelInferRequest) -> None:
        shared_input(r, 0, "r", 8)
        r.inputs[0].contents.fp32_contents.extend([1.0, 2.0])

    def mixed_with_typed(r: pb.ModelInferRequest) -> None:
        shared_input(r, 0, "r", 8)
        r.inputs.add(name="y", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)

    def bad_output(r: pb.ModelInferRequest) -> None:
        out = r.outputs.add(name="y")
        out.parameters["shared_memory_region"].string_param = "r"
        out.parameters["shared_memory_byte_size"].int64_param = 128

    cases = [
        (offset_alone, "input 'x': 'shared_memory_offset' can not be specified without"),
        (string_size, "input 'x': 'shared_memory_byte_size' must be an int64_param"),
        (no_size, "input 'x': 'shared_memory_byte_size' must be given with"),
        (negative, "input 'x': 'shared_memory_offset' must be >= 0, got -8"),
        (beyond, "input 'x': 8 bytes at offset 60 do not fit in shared memory region 'r' (64"),
        (with_contents, "input 'x': has contents and a shared memory region"),
        (mixed_with_typed, "input 'y': send it in raw_input_contents when another input is"),
        (bad_output, "output 'y': 128 bytes at offset 0 do not fit in shared memory region"),
    ]
    for edit, message in cases:
        with pytest.raises(InvalidArgument) as raised:
            planned(edit)
        assert raised.value.message.startswith(message), (edit.__name__, raised.value.message)


def test_a_truncated_object_is_refused_rather_than_crashing_the_worker(
    registry: SharedMemoryRegistry, tmp_path: Path
) -> None:
    path = shm_file(tmp_path, "data", 8192)
    registry.register("r", "/data", 0, 8192)
    os.truncate(path, 16)  # reading the mapping past the end now would be a SIGBUS
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="UINT8", shape=[64])
    shared_input(request, 0, "r", 64, offset=4096)
    with pytest.raises(FailedPrecondition, match="was truncated below the registered size"):
        registry.plan(request)


@pytest.fixture
def shm_key() -> Iterator[str]:
    name = f"meshserve_test_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


async def test_inputs_and_outputs_in_shared_memory_over_grpc(
    client: Client, template_repo: Template, shm_key: str
) -> None:
    x = torch.tensor([[0.25, -1.0, 2.5, 0.75], [1.0, 0.5, -0.25, 3.0]])
    Path("/dev/shm", shm_key).write_bytes(x.numpy().tobytes() + bytes(64))
    stub = client.stub
    await stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="io", key=f"/{shm_key}", byte_size=96)
    )
    status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="io"))
    assert status.regions["io"].key == f"/{shm_key}" and status.regions["io"].byte_size == 96
    request = infer_request("mlp", {"x": x})
    del request.raw_input_contents[:]
    shared_input(request, 0, "io", 32)
    out = request.outputs.add(name="y")
    out.parameters["shared_memory_region"].string_param = "io"
    out.parameters["shared_memory_byte_size"].int64_param = 24
    out.parameters["shared_memory_offset"].int64_param = 32
    response = await stub.ModelInfer(request)
    assert list(response.raw_output_contents) == [b""]
    assert list(response.outputs[0].shape) == [2, 3] and response.outputs[0].datatype == "FP32"
    written = Path("/dev/shm", shm_key).read_bytes()[32:56]
    with torch.inference_mode():
        expected = template_repo.modules["mlp"](x)
    assert torch.equal(
        torch.frombuffer(bytearray(written), dtype=torch.float32).reshape(2, 3), expected
    )

    # The same region on a stream; then a region the worker does not know.
    async def one() -> pb.ModelStreamInferResponse:
        async for reply in stub.ModelStreamInfer(iter([request])):
            return reply
        raise AssertionError("no reply")

    assert (await one()).infer_response.raw_output_contents == [b""]
    unknown = infer_request("mlp", {"x": x})
    del unknown.raw_input_contents[:]
    shared_input(unknown, 0, "elsewhere", 32)
    assert await status_of(stub.ModelInfer(unknown)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "input 'x': shared memory region 'elsewhere' is not registered on this worker",
    )
    plain = await stub.ModelInfer(infer_request("mlp", {"x": x}))
    assert torch.equal(output(plain, "y"), expected)

    for call in (
        stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()),
        stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="g")),
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest()),
    ):
        code, details = await status_of(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED and "CUDA IPC" in details
    metadata = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert "system_shared_memory" in metadata.extensions
    assert "cuda_shared_memory" not in metadata.extensions


async def test_the_worker_unmaps_its_regions_when_it_stops(model_repo: Path, shm_key: str) -> None:
    Path("/dev/shm", shm_key).write_bytes(bytes(64))
    async with worker_client(model_repo, "cpu") as connected:
        await connected.stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="r", key=shm_key, byte_size=64)
        )
        shared = connected.running.worker.shared_memory
        assert [r.name for r in shared.status()] == ["r"]
    assert shared.status() == []
