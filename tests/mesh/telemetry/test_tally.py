"""Request metrics aggregated in plain Python and read by the SDK's readers on collection."""

from __future__ import annotations

import io
from typing import cast

from opentelemetry.metrics import CallbackOptions
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    Histogram,
    Metric,
    MetricsData,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from mesh.telemetry.metrics import (
    CARDINALITY_LIMIT,
    LATENCY_BUCKETS,
    OVERFLOW,
    MeshMetrics,
    RequestTally,
    labels,
)
from mesh.telemetry.setup import TallyExporter, TelemetrySettings, setup


def by_name(data: MetricsData | None) -> dict[str, Metric]:
    assert data is not None
    return {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


def test_reader_sees_counts_buckets_and_in_flight_beside_the_sdks_counters() -> None:
    telemetry = setup(TelemetrySettings(metrics=("memory",)))
    m = telemetry.metrics
    call = labels(method="/svc/M", model_version="3")
    routed = labels(route="r0", destination="inference")
    for seconds in (0.0005, 0.003, 0.003):
        m.started(call)
        m.finished(call, "OK", seconds, routed)
    m.started(call)
    m.finished(call, "UNAVAILABLE", 0.2, routed)
    m.started(call)  # still running at collection
    m.started(call)
    m.abandoned(call)  # handed to another hop, which records it
    m.retried(routed)
    assert telemetry.metric_reader is not None
    metrics = by_name(telemetry.metric_reader.get_metrics_data())
    # One scope: the tally's metrics sit beside the SDK's own counters.
    data = telemetry.metric_reader.get_metrics_data()
    assert data is not None and len(data.resource_metrics[0].scope_metrics) == 1
    assert "meshserve.retries" in metrics
    points = {
        p.attributes["status"]: p.value  # type: ignore[index]
        for p in cast(Sum, metrics["meshserve.requests"].data).data_points
    }
    assert points == {"OK": 3, "UNAVAILABLE": 1}
    assert cast(Sum, metrics["meshserve.requests"].data).is_monotonic
    ok = next(
        p
        for p in cast(Histogram, metrics["meshserve.request.duration"].data).data_points
        if p.attributes == {**call, **routed, "status": "OK"}
    )
    assert ok.count == 3 and abs(ok.sum - 0.0065) < 1e-9
    assert (ok.min, ok.max) == (0.0005, 0.003)
    assert list(ok.explicit_bounds) == list(LATENCY_BUCKETS)
    # 0.0005 is on the first bound (upper bounds inclusive); 0.003 falls in (0.0025, 0.005].
    assert ok.bucket_counts[0] == 1 and ok.bucket_counts[3] == 2 and sum(ok.bucket_counts) == 3
    (flight,) = cast(Sum, metrics["meshserve.requests.in_flight"].data).data_points
    assert dict(flight.attributes or {}) == call and flight.value == 1
    assert not cast(Sum, metrics["meshserve.requests.in_flight"].data).is_monotonic
    assert metrics["meshserve.request.duration"].unit == "s"


def test_without_a_metrics_exporter_nothing_is_kept() -> None:
    telemetry = setup(TelemetrySettings())
    assert telemetry.tally is None
    telemetry.metrics.started(labels(method="/svc/M"))
    telemetry.metrics.finished(labels(method="/svc/M"), "OK", 0.1)
    assert telemetry.metrics.tally is None


def test_an_empty_tally_adds_no_metric() -> None:
    tally = RequestTally(clock_ns=lambda: 5)
    assert tally.metrics() == []
    tally.started({"rpc_method": "/svc/M"})
    assert tally.metrics() == []  # in-flight is the SDK's observable instrument
    tally.finished({"rpc_method": "/svc/M"}, {"rpc_method": "/svc/M", "status": "OK"}, 0.1)
    count, _ = tally.metrics()
    (point,) = cast(Sum, count.data).data_points
    assert (point.start_time_unix_nano, point.time_unix_nano, point.value) == (5, 5, 1)


def test_a_push_exporter_gets_the_request_metrics() -> None:
    out = io.StringIO()
    tally = RequestTally()
    resource = Resource.create({})
    exporter = TallyExporter(ConsoleMetricExporter(out=out), tally, resource)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    try:
        metrics = MeshMetrics(provider.get_meter("meshserve"), tally)
        metrics.started(labels(method="/svc/M"))
        metrics.finished(labels(method="/svc/M"), "OK", 0.1)
        assert provider.force_flush()
    finally:
        provider.shutdown()
    for name in (
        "meshserve.requests",
        "meshserve.request.duration",
        "meshserve.requests.in_flight",
    ):
        assert f'"name": "{name}"' in out.getvalue()


def test_label_sets_beyond_the_limit_share_the_overflow_series() -> None:
    tally = RequestTally()
    for i in range(CARDINALITY_LIMIT + 5):
        call = {"rpc_method": f"/svc/M{i}"}
        tally.started(call)
        tally.finished(call, {**call, "status": "OK"}, 0.001)
    count, duration = tally.metrics()
    points = cast(Sum, count.data).data_points
    assert len(points) == CARDINALITY_LIMIT + 1
    (overflow,) = [p for p in points if p.attributes == {"otel.metric.overflow": True}]
    assert overflow.value == 5
    (latency,) = [
        p
        for p in cast(Histogram, duration.data).data_points
        if p.attributes == {"otel.metric.overflow": True}
    ]
    assert latency.count == 5
    (flight,) = [o for o in tally.in_flight(CallbackOptions()) if o.attributes == dict(OVERFLOW)]
    assert flight.value == 0  # started and finished on the same series
