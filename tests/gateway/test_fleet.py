"""The fleet answers as one Triton server: a real gateway over real inference workers.

Model control, the repository index, statistics and readiness reach every worker
through the gateway (gateway/fleet.py); a recording worker shows requests pass through
byte for byte, and a stalled one that the caller's deadline holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.struct_pb2 import Struct

from gateway.app import Gateway
from gateway.fleet import is_local
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings, Service
from mesh.server.testing import serve
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.embedded import free_port
from tests.gateway.harness import REPO
from workers.inference import testing
from workers.inference.server import RunningWorker, WorkerSettings, run_worker

OIP = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fleet") / "repo"
    testing.publish(str(path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    return path


@dataclass
class Recorder:
    """A worker that records the fleet calls it gets and answers ``answers[method]`` (empty
    by default) or fails with ``failures[method]``; stalls them while ``stall`` is clear."""

    seen: list[tuple[str, bytes]] = field(default_factory=list)
    stall: asyncio.Event | None = None
    answers: dict[str, bytes] = field(default_factory=dict)
    failures: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)

    def service(self) -> Service:
        def handler(method: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
            async def answer(request: bytes, context: Any) -> bytes:
                self.seen.append((method, request))
                if self.stall is not None:
                    await self.stall.wait()
                if method in self.failures:
                    await context.abort(*self.failures[method])
                return self.answers.get(method, b"")

            return answer

        methods = (
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "RepositoryIndex",
            "SystemSharedMemoryRegister",
            "SystemSharedMemoryStatus",
            "SystemSharedMemoryUnregister",
        )

        def register(server: grpc.aio.Server) -> None:
            handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
                m: grpc.unary_unary_rpc_method_handler(handler(m)) for m in methods
            }
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(OIP, handlers)])

        return Service(OIP, register)


@asynccontextmanager
async def recorders(*workers: Recorder) -> AsyncIterator[Fleet]:
    async with AsyncExitStack() as stack:
        addresses = []
        for recorder in workers:
            serving, _ = await stack.enter_async_context(serve([recorder.service()]))
            addresses.append(serving.address)
        yield await stack.enter_async_context(fleet(addresses))


@dataclass
class Fleet:
    gateway: Gateway
    channel: grpc.aio.Channel
    addresses: list[str]

    @property
    def stub(self) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)


@asynccontextmanager
async def fleet(addresses: list[str]) -> AsyncIterator[Fleet]:
    instances = [StaticInstance("inference", f"w{i}", a) for i, a in enumerate(addresses)]
    gateway = Gateway(StaticDiscovery(instances), config_dir=REPO / "config")
    serving = await gateway.start(ServerSettings())
    channel = grpc.aio.insecure_channel(serving.address)
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while len(gateway.state.snapshot.endpoints("inference")) != len(addresses):
            assert asyncio.get_running_loop().time() < deadline, "the gateway never saw them"
            await asyncio.wait_for(gateway.endpoints_changed.wait(), timeout=10)
        yield Fleet(gateway, channel, addresses)
    finally:
        await channel.close()
        await serving.drain(grace=0)


@asynccontextmanager
async def two_workers(repository: Path) -> AsyncIterator[tuple[list[RunningWorker], Fleet]]:
    settings = WorkerSettings(str(repository), device="cpu", poll_interval_s=0)
    async with AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(run_worker(settings)) for _ in range(2)]
        addresses = [w.serving.address for w in workers]
        yield workers, await stack.enter_async_context(fleet(addresses))


async def status_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def index_rows(response: pb.RepositoryIndexResponse) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in response.models}


async def test_unload_and_load_reach_every_worker(repository: Path) -> None:
    async with two_workers(repository) as (workers, mesh):
        stub = mesh.stub
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10)).ready

        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp"))
        assert not any(w.repository.is_ready("mlp", "") for w in workers)
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10)).ready
        index = index_rows(await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10))
        a, b = sorted(mesh.addresses)  # workers are asked, and named, in address order
        assert index == {
            ("mlp", ""): ("UNAVAILABLE", f"{a}: UNAVAILABLE: unloaded; {b}: UNAVAILABLE: unloaded")
        }

        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"))
        assert all(w.repository.is_ready("mlp", "") for w in workers)
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10)).ready
        index = index_rows(await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10))
        assert index == {("mlp", "1"): ("READY", "")}


async def test_statistics_sum_over_the_workers(repository: Path) -> None:
    async with two_workers(repository) as (workers, mesh):
        request = pb.ModelInferRequest(model_name="mlp")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend([0.5, -1.0, 2.0, 0.1])
        # Straight to each worker: 3 on one, 2 on the other.
        for running, count in zip(workers, (3, 2), strict=True):
            async with grpc.aio.insecure_channel(running.serving.address) as channel:
                direct = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(count):
                    await direct.ModelInfer(request, timeout=30)
        reply = await mesh.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"), timeout=10)
        (stats,) = reply.model_stats
        assert (stats.name, stats.version, stats.inference_count) == ("mlp", "1", 5)
        assert stats.inference_stats.success.count == 5
        code, message = await status_of(
            mesh.stub.ModelStatistics(pb.ModelStatisticsRequest(name="ghost"), timeout=10)
        )
        assert code is grpc.StatusCode.NOT_FOUND and "ghost" in message


async def test_a_failure_names_each_worker_and_its_message(repository: Path) -> None:
    async with two_workers(repository) as (_, mesh):
        code, message = await status_of(
            mesh.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"))
        )
        a, b = sorted(mesh.addresses)  # workers are asked, and named, in address order
        assert code is grpc.StatusCode.NOT_FOUND
        assert message == (
            "load of model 'ghost' failed on 2 of 2 workers: "
            f"{a}: NOT_FOUND: model 'ghost' is not in the repository; "
            f"{b}: NOT_FOUND: model 'ghost' is not in the repository"
        )


async def test_a_worker_that_is_down_is_named_with_the_worst_status(repository: Path) -> None:
    settings = WorkerSettings(str(repository), device="cpu", poll_interval_s=0)
    nobody = f"127.0.0.1:{free_port()}"  # registered, but nothing listens there
    async with run_worker(settings) as running, fleet([running.serving.address, nobody]) as mesh:
        code, message = await status_of(
            mesh.stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="mlp"), timeout=10
            )
        )
        assert code is grpc.StatusCode.UNAVAILABLE
        assert message.startswith(f"unload of model 'mlp' failed on 1 of 2 workers: {nobody}: ")
        # The worker that answered did unload it.
        assert not running.repository.is_ready("mlp", "")


async def test_requests_pass_through_untouched() -> None:
    workers = [Recorder(), Recorder()]
    async with recorders(*workers) as mesh:
        request = pb.RepositoryModelLoadRequest(model_name="simple")
        request.parameters["config"].string_param = '{"max_batch_size": 8}'
        request.parameters["file:1/model.pt"].bytes_param = b"\x00weights"
        await mesh.stub.RepositoryModelLoad(request, timeout=10)
        for recorder in workers:
            assert recorder.seen == [("RepositoryModelLoad", request.SerializeToString())]


async def test_a_stalled_worker_is_named_before_the_callers_deadline(repository: Path) -> None:
    stalled = Recorder(stall=asyncio.Event())
    settings = WorkerSettings(str(repository), device="cpu", poll_interval_s=0)
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(run_worker(settings))
        serving, _ = await stack.enter_async_context(serve([stalled.service()]))
        mesh = await stack.enter_async_context(fleet([running.serving.address, serving.address]))
        assert stalled.stall is not None
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            reply = await mesh.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=3)
            took = loop.time() - started
            # The index answers, before the caller's deadline, with what the others know,
            # naming the worker that did not answer (it may not serve the model).
            assert took < 3
            state, reason = index_rows(reply)[("mlp", "1")]
            assert state == "READY"
            assert reason.startswith(f"{serving.address}: did not answer: DEADLINE_EXCEEDED")
            code, message = await status_of(
                mesh.stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=3
                )
            )
        finally:
            stalled.stall.set()
        # A load must reach every worker: the gateway's own DEADLINE_EXCEEDED names it.
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert message.startswith("load of model 'mlp' failed on 1 of 2 workers: ")
        assert f"{serving.address}: DEADLINE_EXCEEDED: no answer within" in message


def regions(**sizes: int) -> bytes:
    """A SystemSharedMemoryStatusResponse by wire shape (``map<string, RegionStatus>
    regions = 1``): Struct is ``map<string, Value> fields = 1``."""
    message = Struct()
    message.update(sizes)
    return message.SerializeToString()


async def test_system_shared_memory_reaches_the_workers_on_this_host() -> None:
    workers = [Recorder(), Recorder()]
    workers[0].answers["SystemSharedMemoryStatus"] = regions(input=64)
    workers[1].answers["SystemSharedMemoryStatus"] = regions(output=32)
    workers[1].failures["SystemSharedMemoryUnregister"] = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "no region 'ghost'",
    )
    async with recorders(*workers) as mesh:

        def call(method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
            return mesh.channel.unary_unary(f"/{OIP}/{method}")

        register = b"\x0a\x05input\x12\x08/shm-in0"  # name, key: forwarded as they came
        assert await call("SystemSharedMemoryRegister")(register, timeout=10) == b""
        assert all(("SystemSharedMemoryRegister", register) in w.seen for w in workers)
        status = await call("SystemSharedMemoryStatus")(b"", timeout=10)
        assert dict(Struct.FromString(status)) == {"input": 64, "output": 32}
        code, message = await status_of(call("SystemSharedMemoryUnregister")(b"", timeout=10))
        failing = mesh.addresses[1]  # the second recorder's
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert message == (
            "SystemSharedMemoryUnregister failed on 1 of 2 workers: "
            f"{failing}: FAILED_PRECONDITION: no region 'ghost'"
        )


async def test_real_workers_answer_shared_memory_and_cuda_is_refused(repository: Path) -> None:
    async with two_workers(repository) as (_, mesh):
        status: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = mesh.channel.unary_unary(
            f"/{OIP}/SystemSharedMemoryStatus"
        )
        # The workers implement it: one answer for both, with no region registered yet.
        assert await status(b"", timeout=10) == b""
        cuda: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = mesh.channel.unary_unary(
            f"/{OIP}/CudaSharedMemoryRegister"
        )
        code, message = await status_of(cuda(b"", timeout=10))
        assert code is grpc.StatusCode.UNIMPLEMENTED
        assert message.startswith("CUDA shared memory is not supported by meshserve: ")


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:9001", True),
        ("127.0.0.53:9001", True),  # all of 127/8 is loopback
        ("localhost:9001", True),
        ("[::1]:9001", True),
        ("10.0.0.7:9001", True),  # one of this host's own addresses
        ("10.0.0.8:9001", False),
        ("worker-2.example:9001", False),
    ],
)
def test_shared_memory_goes_to_the_workers_on_this_host(address: str, local: bool) -> None:
    assert is_local(address, frozenset({"10.0.0.7"})) is local
