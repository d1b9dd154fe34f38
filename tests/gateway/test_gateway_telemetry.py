"""The gateway counts retries and ring changes, and parents upstream calls on its span."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import cast

import grpc
import grpc.aio
from opentelemetry.sdk.metrics.export import Sum

from gateway.app import Gateway
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from mesh.telemetry.setup import TelemetrySettings, setup
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.backends import FakeWorker
from tests.gateway.harness import REPO


async def test_retries_ring_changes_and_span_parenting() -> None:
    telemetry = setup(TelemetrySettings(traces="memory", metrics=("memory",)))
    failing, healthy = FakeWorker("bad", fail_with=grpc.StatusCode.UNAVAILABLE), FakeWorker("ok")
    async with AsyncExitStack() as stack:
        addresses = []
        for worker in (failing, healthy):
            serving, _ = await stack.enter_async_context(serve(worker.services()))
            addresses.append(serving.address)
        discovery = StaticDiscovery(
            [StaticInstance("inference", f"i{n}", a) for n, a in enumerate(addresses)]
        )
        gateway = Gateway(
            discovery,
            config_dir=REPO / "config",
            telemetry=telemetry,
            metrics=telemetry.metrics,
        )
        serving = await gateway.start(ServerSettings())
        # The relay traces the calls it forwards itself; no gRPC hop behind it does.
        assert gateway.relay is not None
        stack.push_async_callback(serving.drain, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(gateway.state.snapshot.endpoints("inference")) < 2:
            assert loop.time() < deadline
            await asyncio.wait_for(gateway.endpoints_changed.wait(), timeout=10)
        async with grpc.aio.insecure_channel(serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # Some model lands on the failing worker first and is retried on the other.
            returned = []
            for i in range(20):
                # The first call brings its own id; the gateway makes the others'.
                sent = (("x-request-id", "client-chosen-id"),) if i == 0 else ()
                call = stub.ModelInfer(
                    pb.ModelInferRequest(model_name=f"m{i}"), timeout=10, metadata=sent
                )
                reply = await call
                assert reply.id == "ok"
                returned.append(dict(await call.initial_metadata())["x-request-id"])
    assert failing.seen, "no request was tried on the failing worker first"
    assert telemetry.spans is not None
    gateway_spans = list(telemetry.spans.get_finished_spans())
    assert len(gateway_spans) == 20
    # Each upstream call carried the gateway's span as parent.
    span_ids = {f"{s.context.span_id:016x}" for s in gateway_spans if s.context is not None}
    parents = {m["traceparent"].split("-")[2] for m in failing.seen + healthy.seen}
    assert parents <= span_ids and parents
    # The id the gateway returned names the call's span, and reached the worker.
    assert returned[0] == "client-chosen-id" and len(set(returned)) == 20
    spans_by_id = {dict(s.attributes or {}).get("meshserve.request_id") for s in gateway_spans}
    assert spans_by_id == set(returned)
    assert {m["x-request-id"] for m in healthy.seen} <= set(returned)
    retried = [s for s in gateway_spans if dict(s.attributes or {}).get("meshserve.retry_count")]
    assert len(retried) == len(failing.seen)
    assert telemetry.metric_reader is not None
    data = telemetry.metric_reader.get_metrics_data()
    assert data is not None
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    retries = cast(Sum, metrics["meshserve.retries"].data).data_points
    assert sum(int(p.value) for p in retries) == len(failing.seen)
    (point, *_) = retries
    assert dict(point.attributes or {})["route"] == "VirtualService/inference http[0] (infer)"
    # Five consecutive UNAVAILABLEs eject the failing worker (the sample outlierDetection).
    if len(failing.seen) >= 5:
        (ejection,) = cast(Sum, metrics["meshserve.outlier.ejections"].data).data_points
        assert dict(ejection.attributes or {})["destination"] == "inference"
    # Requests are counted per route and destination, learned as the proxy routed them.
    requests = cast(Sum, metrics["meshserve.requests"].data).data_points
    assert sum(int(p.value) for p in requests) == 20
    for p in requests:
        attributes = dict(p.attributes or {})
        assert attributes["destination"] == "inference"
        assert attributes["route"] == "VirtualService/inference http[0] (infer)"
        assert attributes["status"] == "OK"
    (flight,) = cast(Sum, metrics["meshserve.requests.in_flight"].data).data_points
    assert flight.value == 0
    rings = cast(Sum, metrics["meshserve.ring.changes"].data).data_points
    assert {dict(p.attributes or {})["destination"] for p in rings} == {"inference"}
    telemetry.shutdown()
