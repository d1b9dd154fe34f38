"""DestinationRule connectionPool through the real relay, with Envoy's meaning for HTTP/2
upstreams: streams per connection (counted as connections a real upstream accepted),
pending calls past maxConnections shed at once, retries outstanding bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import cast

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.metrics.export import Sum

from gateway.app import Gateway
from mesh.routing import circuit
from mesh.routing.circuit import CircuitBreakers
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from mesh.telemetry.metrics import MeshMetrics
from mesh.telemetry.setup import TelemetrySettings, setup
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.backends import Context, FakeWorker
from tests.gateway.test_relay import until

CONFIG = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - route: [{destination: {host: inference}}]
      RETRIES
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy:
    connectionPool: POOL
"""


class SlowFailure(FakeWorker):
    """Each call takes ``delay`` seconds to fail UNAVAILABLE: attempts overlap in time."""

    delay = 0.15

    async def model_infer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        self._enter(context)
        await asyncio.sleep(self.delay)  # the upstream's own slowness, not a test wait
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} failed slowly")


class Edge:
    def __init__(self, gateway: Gateway, worker: FakeWorker, channel: grpc.aio.Channel) -> None:
        self.gateway = gateway
        self.worker = worker
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def breakers(self) -> CircuitBreakers:
        relay = self.gateway.relay
        assert relay is not None
        return relay.pool.breakers[("inference", "")]


@asynccontextmanager
async def one_stream_server(worker: FakeWorker) -> AsyncIterator[str]:
    """``worker`` on a gRPC server that takes one stream per connection at a time (it
    advertises SETTINGS_MAX_CONCURRENT_STREAMS 1); yields its address."""
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1)])
    for service in worker.services():
        service.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@asynccontextmanager
async def edge(
    tmp_path: Path,
    pool: str,
    worker: FakeWorker,
    retries: str = "retries: {}",
    metrics: MeshMetrics | None = None,
    *,
    one_stream: bool = False,
) -> AsyncIterator[Edge]:
    (tmp_path / "inference.yaml").write_text(
        CONFIG.replace("POOL", pool).replace("RETRIES", retries)
    )
    async with AsyncExitStack() as stack:
        if one_stream:
            address = await stack.enter_async_context(one_stream_server(worker))
        else:
            serving, _ = await stack.enter_async_context(serve(worker.services()))
            address = serving.address
        gateway = Gateway(
            StaticDiscovery([StaticInstance("inference", worker.name, address)]),
            config_dir=tmp_path,
            metrics=metrics,
        )
        front = await gateway.start(ServerSettings())
        stack.push_async_callback(front.drain, 0)
        await until(lambda: len(gateway.state.snapshot.endpoints("inference")) == 1)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(front.address))
        try:
            yield Edge(gateway, worker, channel)
        finally:
            if worker.hold is not None:
                worker.hold.set()


def infer() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m")


@pytest.mark.parametrize("concurrent", [False, True])
async def test_max_requests_per_connection_drains_each_connection_after_n_calls(
    tmp_path: Path, concurrent: bool
) -> None:
    pool = "{http: {maxRequestsPerConnection: 2}}"
    async with edge(tmp_path, pool, FakeWorker("w0")) as e:
        if concurrent:
            replies = await asyncio.gather(
                *(e.stub.ModelInfer(infer(), timeout=10) for _ in range(5))
            )
        else:
            replies = [await e.stub.ModelInfer(infer(), timeout=10) for _ in range(5)]
        assert [r.id for r in replies] == ["w0"] * 5  # no call failed
        # 2 + 2 + 1: three connections the upstream accepted, two calls on each of two.
        assert len(e.worker.peers) == 5
        assert sorted(e.worker.peers.count(p) for p in set(e.worker.peers)) == [1, 2, 2]
        # Drained connections close once their calls are done.
        await until(lambda: e.breakers().connections == 1)


async def test_pending_calls_past_the_limit_are_shed_at_once(tmp_path: Path) -> None:
    """maxConnections 1 and one stream a connection: a second call must wait for the first
    connection to close. Two may wait (http1MaxPendingRequests); the rest are shed at
    once with UNAVAILABLE and Envoy's x-envoy-overloaded, and the waiting ones succeed."""
    pool = (
        "{tcp: {maxConnections: 1},"
        " http: {maxRequestsPerConnection: 1, http1MaxPendingRequests: 2}}"
    )
    hold = asyncio.Event()
    worker = FakeWorker("w0", hold=hold)  # a slow upstream: answers when told
    async with edge(tmp_path, pool, worker) as e:
        first = asyncio.ensure_future(e.stub.ModelInfer(infer(), timeout=10))
        await until(lambda: len(worker.seen) == 1)  # connected, and held by the upstream
        calls = [asyncio.ensure_future(e.stub.ModelInfer(infer(), timeout=10)) for _ in range(5)]
        # Three are answered while the upstream still holds the first: shed, not queued.
        await until(lambda: sum(c.done() for c in calls) == 3)
        shed = [c for c in calls if c.done()]
        for call in shed:
            error = call.exception()
            assert isinstance(error, grpc.aio.AioRpcError)
            assert error.code() is grpc.StatusCode.UNAVAILABLE
            assert "pending overflow" in (error.details() or "")
            assert "http1MaxPendingRequests: 2" in (error.details() or "")
            assert ("x-envoy-overloaded", "true") in tuple(error.trailing_metadata() or ())
        breakers = e.breakers()
        assert (breakers.pending, breakers.overflows[circuit.PENDING]) == (2, 3)
        assert len(worker.seen) == 1  # the waiting two have not reached the upstream
        hold.set()
        waited = [c for c in calls if not c.done()]
        replies = await asyncio.gather(first, *waited)
        assert [r.id for r in replies] == ["w0"] * 3
        # One after the other, each on its own connection (maxConnections 1).
        assert len(set(worker.peers)) == 3
        assert breakers.pending == 0


async def test_calls_wait_for_stream_capacity_at_max_connections(tmp_path: Path) -> None:
    """HTTP/2 as Envoy pools it: an upstream taking one stream at a time, maxConnections 1.
    A second call cannot open another connection: it waits (pending) for the stream to
    end and then goes on the same connection; calls past http1MaxPendingRequests are
    shed at once."""
    pool = "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}"
    hold = asyncio.Event()
    worker = FakeWorker("w0", hold=hold)
    async with edge(tmp_path, pool, worker, one_stream=True) as e:
        first = asyncio.ensure_future(e.stub.ModelInfer(infer(), timeout=10))
        await until(lambda: len(worker.seen) == 1)
        calls = [asyncio.ensure_future(e.stub.ModelInfer(infer(), timeout=10)) for _ in range(3)]
        await until(lambda: sum(c.done() for c in calls) == 2)
        for call in [c for c in calls if c.done()]:
            error = call.exception()
            assert isinstance(error, grpc.aio.AioRpcError)
            assert error.code() is grpc.StatusCode.UNAVAILABLE
        breakers = e.breakers()
        assert breakers.overflows[circuit.PENDING] == 2
        assert breakers.overflows[circuit.CONNECTIONS] >= 1
        hold.set()
        replies = await asyncio.gather(first, *(c for c in calls if not c.done()))
        assert [r.id for r in replies] == ["w0", "w0"]
        assert len(set(worker.peers)) == 1  # one connection carried both, in turn
        assert breakers.connections == 1


async def test_retries_past_max_retries_are_not_attempted(tmp_path: Path) -> None:
    """Four calls fail together; one retry may be outstanding at a time (maxRetries 1), so
    the first to fail retries (three times, one after the other) and the other three end
    with their original error, each counted as a retry overflow."""
    pool = "{http: {maxRetries: 1}}"
    retries = "retries: {attempts: 3, retryOn: unavailable}"
    worker = SlowFailure("w0")
    telemetry = setup(TelemetrySettings(metrics=("memory",)))
    async with edge(tmp_path, pool, worker, retries, telemetry.metrics) as e:
        results = await asyncio.gather(
            *(e.stub.ModelInfer(infer(), timeout=10) for _ in range(4)), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert result.code() is grpc.StatusCode.UNAVAILABLE
            assert result.details() == "w0 failed slowly"  # the upstream's own answer
        assert len(worker.seen) == 4 + 3
        breakers = e.breakers()
        assert breakers.overflows[circuit.RETRIES] == 3
        assert breakers.retries == 0
    # Exported as meshserve_overflows_total{destination="inference", limit="retries"}.
    assert telemetry.metric_reader is not None
    data = telemetry.metric_reader.get_metrics_data()
    assert data is not None
    (metric,) = [
        m
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "meshserve.overflows"
    ]
    (point,) = cast(Sum, metric.data).data_points
    assert dict(point.attributes or {}) == {"destination": "inference", "limit": "retries"}
    assert point.value == 3


async def test_without_limits_retries_are_not_bounded(tmp_path: Path) -> None:
    """The same calls under Istio's default (maxRetries 2^32-1): every call retries."""
    worker = SlowFailure("w0")
    retries = "retries: {attempts: 1, retryOn: unavailable}"
    async with edge(tmp_path, "{http: {maxRetries: 0}}", worker, retries) as e:
        results = await asyncio.gather(
            *(e.stub.ModelInfer(infer(), timeout=10) for _ in range(4)), return_exceptions=True
        )
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
        assert len(worker.seen) == 8
        assert e.breakers().overflows[circuit.RETRIES] == 0


async def test_a_call_that_gives_up_while_pending_leaves_the_queue(tmp_path: Path) -> None:
    """A queued call whose client deadline passes is gone from the queue (it holds no
    pending place), and the pool serves the next calls as before."""
    pool = (
        "{tcp: {maxConnections: 1},"
        " http: {maxRequestsPerConnection: 1, http1MaxPendingRequests: 1}}"
    )
    hold = asyncio.Event()
    worker = FakeWorker("w0", hold=hold)
    async with edge(tmp_path, pool, worker) as e:
        first = asyncio.ensure_future(e.stub.ModelInfer(infer(), timeout=10))
        await until(lambda: len(worker.seen) == 1)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await e.stub.ModelInfer(infer(), timeout=0.3)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: e.breakers().pending == 0)
        # The place it held is free: another call may wait (one is allowed).
        waiting = asyncio.ensure_future(e.stub.ModelInfer(infer(), timeout=10))
        await until(lambda: e.breakers().pending == 1)
        hold.set()
        assert [r.id for r in await asyncio.gather(first, waiting)] == ["w0", "w0"]
        assert len(worker.seen) == 2  # the call that gave up never reached the upstream
        assert e.breakers().overflows[circuit.PENDING] == 0
