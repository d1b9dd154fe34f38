"""The sidecar reads its worker's load report (ServerReady trailers) for the registry."""

from __future__ import annotations

import grpc
import grpc.aio

from mesh.balance.report import LoadReport
from mesh.server.app import Service
from mesh.server.testing import serve
from mesh.sidecar.load import LoadProbe, model_refs, registry_load
from protos.inference import grpc_service_pb2 as pb
from registry.instances import Load, ModelRef

REPORT = LoadReport(
    in_flight=3,
    queue_depth=2,
    loaded_versions=("resnet:2", "bert:10", "malformed"),
    memory_bytes=4096,
    memory_budget_bytes=8192,
)
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def reporting(trailers: tuple[tuple[str, str], ...]) -> Service:
    """ServerReady as the inference worker answers it: with its load in the trailers."""

    async def server_ready(
        request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerReadyResponse:
        context.set_trailing_metadata(trailers)
        return pb.ServerReadyResponse(ready=True)

    handler = grpc.unary_unary_rpc_method_handler(
        server_ready,
        request_deserializer=pb.ServerReadyRequest.FromString,
        response_serializer=pb.ServerReadyResponse.SerializeToString,
    )

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"ServerReady": handler})]
        )

    return Service(SERVICE, register)


def test_registry_figures_from_a_report() -> None:
    assert model_refs(REPORT) == (ModelRef("bert", "10"), ModelRef("resnet", "2"))
    assert registry_load(REPORT, 1) == Load(in_flight=3, queue_depth=2, memory_bytes=4096)
    # The sidecar's own count is the floor (a burst since the worker's last report).
    assert registry_load(REPORT, 7).in_flight == 7
    assert registry_load(None, 5) == Load(in_flight=5)


async def test_probe_reads_the_workers_report() -> None:
    async with serve([reporting(REPORT.metadata())]) as (_, channel):
        probe = LoadProbe(channel)
        assert await probe.read() == REPORT
        assert await probe.read() == REPORT and probe.supported


async def test_probe_gives_up_on_workers_without_a_report() -> None:
    # No inference service at all (a data or training worker): UNIMPLEMENTED, asked once.
    async with serve([]) as (_, channel):
        probe = LoadProbe(channel)
        assert await probe.read() is None and not probe.supported
    # ServerReady without meshserve's trailers (another OIP server): nothing to read.
    async with serve([reporting(())]) as (_, channel):
        probe = LoadProbe(channel)
        assert await probe.read() is None and not probe.supported
