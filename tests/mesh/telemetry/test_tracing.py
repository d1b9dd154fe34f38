"""One request, one trace: parent-child spans across client and servers, in and across processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.metrics.export import Sum
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from mesh.telemetry.interceptors import TelemetryClientInterceptor
from mesh.telemetry.logs import LOG_FORMAT, TraceIdFilter
from mesh.telemetry.propagation import continued, extract, inject
from mesh.telemetry.setup import Telemetry, TelemetrySettings, setup
from tests.mesh.telemetry.relay import CALL, DENY, start_relay

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = setup(TelemetrySettings(traces="memory", metrics=("memory",)))
    yield t
    t.shutdown()


async def _call(channel: grpc.aio.Channel, path: str = CALL, **kwargs: object) -> bytes:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return await method(b"x", timeout=10, **kwargs)  # type: ignore[arg-type]


async def _spans(telemetry: Telemetry, count: int) -> list[ReadableSpan]:
    """Client spans end in a grpc callback: poll until all ``count`` have arrived."""
    assert telemetry.spans is not None
    deadline = asyncio.get_running_loop().time() + 10
    while len(telemetry.spans.get_finished_spans()) < count:
        assert asyncio.get_running_loop().time() < deadline, telemetry.spans.get_finished_spans()
        await asyncio.sleep(0.01)
    return list(telemetry.spans.get_finished_spans())


async def test_one_request_is_one_trace_of_parent_child_spans(
    telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(TraceIdFilter())
    backend = await start_relay("backend", telemetry)
    relay = await start_relay("relay", telemetry, upstream=backend.address)
    try:
        async with grpc.aio.insecure_channel(
            relay.address, interceptors=[TelemetryClientInterceptor(telemetry)]
        ) as channel:
            assert await _call(channel) == b"relay>backend"
        spans = await _spans(telemetry, 4)
    finally:
        await relay.drain(grace=0)
        await backend.drain(grace=0)
    by_kind = sorted(spans, key=lambda s: s.start_time or 0)
    client, relay_server, relay_client, backend_server = by_kind
    assert [s.kind for s in by_kind] == [
        SpanKind.CLIENT,
        SpanKind.SERVER,
        SpanKind.CLIENT,
        SpanKind.SERVER,
    ]
    trace_ids = {s.context.trace_id for s in spans if s.context is not None}
    assert len(trace_ids) == 1
    assert client.parent is None
    for child, parent in [
        (relay_server, client),
        (relay_client, relay_server),
        (backend_server, relay_client),
    ]:
        assert child.parent is not None and parent.context is not None
        assert child.parent.span_id == parent.context.span_id
    assert backend_server.name == "meshtest.Relay/Call"
    assert dict(backend_server.attributes or {})["rpc.service"] == "meshtest.Relay"
    assert dict(backend_server.attributes or {})["rpc.grpc.status_code"] == 0
    # The handler's log line carries the trace id of its span.
    record = next(r for r in caplog.records if r.getMessage() == "backend handling a call")
    assert record.trace_id == format(trace_ids.pop(), "032x")  # type: ignore[attr-defined]
    assert "%(trace_id)s" in LOG_FORMAT


async def test_errors_mark_the_span_and_count_by_status(telemetry: Telemetry) -> None:
    backend = await start_relay("backend", telemetry)
    try:
        async with grpc.aio.insecure_channel(backend.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await _call(channel, DENY, metadata=(("x-model-version", "3"),))
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        (span,) = await _spans(telemetry, 1)
    finally:
        await backend.drain(grace=0)
    assert span.status.status_code is StatusCode.ERROR
    assert "PERMISSION_DENIED: not you" in (span.status.description or "")
    attributes = dict(span.attributes or {})
    assert attributes["rpc.grpc.status_code"] == 7
    assert attributes["meshserve.model.version"] == "3"
    assert telemetry.metric_reader is not None
    data = telemetry.metric_reader.get_metrics_data()
    assert data is not None
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    (point,) = cast(Sum, metrics["meshserve.requests"].data).data_points
    assert point.value == 1
    assert dict(point.attributes or {}) == {
        "rpc_method": DENY,
        "model_version": "3",
        "status": "PERMISSION_DENIED",
    }
    (flight,) = cast(Sum, metrics["meshserve.requests.in_flight"].data).data_points
    assert flight.value == 0


def test_propagation_round_trip_and_garbage() -> None:
    telemetry = setup(TelemetrySettings(traces="memory"))
    with telemetry.tracer.start_as_current_span("outer") as span:
        metadata = inject([("x-request-id", "r1"), ("traceparent", "00-stale-stale-01")])
    keys = [k for k, _ in metadata]
    assert keys.count("traceparent") == 1 and "x-request-id" in keys
    from opentelemetry import trace

    extracted = trace.get_current_span(extract(metadata)).get_span_context()
    assert extracted.trace_id == span.get_span_context().trace_id
    assert extracted.span_id == span.get_span_context().span_id
    bad = trace.get_current_span(extract([("traceparent", "garbage")])).get_span_context()
    assert not bad.is_valid


def test_calls_made_while_serving_continue_the_callers_trace() -> None:
    """A worker without spans of its own: its sidecar's span parents its outgoing calls."""
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with continued([("traceparent", caller), ("x-request-id", "r1")]):
        sent = dict(inject([("x-request-id", "r1")]))
    assert sent == {"x-request-id": "r1", "traceparent": caller}
    # Outside the block nothing is carried over.
    assert inject([]) == []


def _start(
    name: str, spans: Path, upstream: str | None = None
) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "-m",
        "tests.mesh.telemetry.relay",
        "--name",
        name,
        "--spans",
        str(spans),
    ]
    if upstream:
        command += ["--upstream", upstream]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on "), f"{name} did not start: {line!r}"
    return process, f"127.0.0.1:{line.split()[-1]}"


@pytest.mark.e2e
async def test_one_trace_across_three_processes(tmp_path: Path, telemetry: Telemetry) -> None:
    processes: list[subprocess.Popen[str]] = []
    try:
        backend, backend_address = _start("worker", tmp_path / "worker.jsonl")
        processes.append(backend)
        sidecar, sidecar_address = _start("sidecar", tmp_path / "sidecar.jsonl", backend_address)
        processes.append(sidecar)
        async with grpc.aio.insecure_channel(
            sidecar_address, interceptors=[TelemetryClientInterceptor(telemetry)]
        ) as channel:
            assert await _call(channel) == b"sidecar>worker"
        (client,) = await _spans(telemetry, 1)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()
    # Spans are exported synchronously at end(), so the files are complete now.
    remote = [
        json.loads(line)
        for f in ("sidecar.jsonl", "worker.jsonl")
        for line in (tmp_path / f).read_text().splitlines()
    ]
    assert client.context is not None
    trace_id = f"0x{client.context.trace_id:032x}"
    assert {s["context"]["trace_id"] for s in remote} == {trace_id}
    by_service = {(s["resource"]["attributes"]["service.name"], s["kind"]): s for s in remote}
    sidecar_server = by_service[("sidecar", "SpanKind.SERVER")]
    sidecar_client = by_service[("sidecar", "SpanKind.CLIENT")]
    worker_server = by_service[("worker", "SpanKind.SERVER")]
    assert sidecar_server["parent_id"] == f"0x{client.context.span_id:016x}"
    assert sidecar_client["parent_id"] == sidecar_server["context"]["span_id"]
    assert worker_server["parent_id"] == sidecar_client["context"]["span_id"]
