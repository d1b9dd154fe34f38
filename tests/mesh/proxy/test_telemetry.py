"""The relay's telemetry without sockets: which trace context the upstream call carries."""

from __future__ import annotations

import grpc

from mesh.proxy.hpack_codec import Header
from mesh.proxy.telemetry import RelayTelemetry
from mesh.telemetry.setup import TelemetrySettings, setup

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def upstream_traceparent(traces: str) -> str:
    telemetry = setup(TelemetrySettings(traces=traces))
    relay = RelayTelemetry(telemetry)
    record = relay.start(
        INFER, [(b":path", INFER.encode()), (b"traceparent", CALLER.encode())], "r-1"
    )
    headers: list[Header] = relay.attempt(record, "127.0.0.1:50051", 0)
    relay.finish(record, grpc.StatusCode.OK, None)
    telemetry.shutdown()
    (value,) = [v.decode() for n, v in headers if n == b"traceparent"]
    return value


def test_a_tracing_relay_makes_its_span_the_upstreams_parent() -> None:
    value = upstream_traceparent("memory")
    trace_id, span_id = value.split("-")[1:3]
    assert trace_id == CALLER.split("-")[1]
    assert span_id != CALLER.split("-")[2]


def test_without_an_exporter_the_callers_context_goes_on_unchanged() -> None:
    assert upstream_traceparent("none") == CALLER


def test_the_relay_records_calls_only_when_something_reads_the_records() -> None:
    # No exporter (as `up` runs its sidecars): no per-call record at all.
    assert not RelayTelemetry.records(setup(TelemetrySettings()))
    assert RelayTelemetry.records(setup(TelemetrySettings(traces="memory")))
    assert RelayTelemetry.records(setup(TelemetrySettings(metrics=("memory",))))
