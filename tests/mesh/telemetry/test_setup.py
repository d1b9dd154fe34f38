"""Telemetry settings, the Prometheus scrape endpoint, and the log filter outside spans."""

from __future__ import annotations

import importlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mesh.errors import InvalidArgument
from mesh.telemetry.logs import TraceIdFilter
from mesh.telemetry.metrics import labels
from mesh.telemetry.setup import TelemetrySettings, setup


def test_settings_from_env() -> None:
    settings = TelemetrySettings.from_env(
        {
            "OTEL_SERVICE_NAME": "sidecar",
            "MESHSERVE_TRACES": "file:/tmp/spans.jsonl",
            "MESHSERVE_METRICS": "prometheus, console",
            "MESHSERVE_PROMETHEUS": "0.0.0.0:9100",
        }
    )
    assert settings.service_name == "sidecar"
    assert (settings.traces, settings.traces_file) == ("file", Path("/tmp/spans.jsonl"))
    assert settings.metrics == ("prometheus", "console")
    assert (settings.prometheus_host, settings.prometheus_port) == ("0.0.0.0", 9100)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"traces": "jaeger"}, "traces exporter 'jaeger'"),
        ({"traces": "file"}, "needs traces_file"),
        ({"metrics": ("statsd",)}, "metrics exporter 'statsd'"),
        ({"prometheus_port": 70000}, "out of range"),
        ({"service_name": ""}, "service_name"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        TelemetrySettings(**kwargs)  # type: ignore[arg-type]


def test_env_prometheus_address_is_validated() -> None:
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        TelemetrySettings.from_env({"MESHSERVE_PROMETHEUS": "localhost"})


def test_prometheus_scrape_endpoint_exposes_mesh_metrics() -> None:
    telemetry = setup(TelemetrySettings(metrics=("prometheus",), prometheus_port=0))
    try:
        assert telemetry.prometheus is not None
        m = telemetry.metrics
        route = labels(route="inference-0", destination="inference/v2", model_version="2")
        m.started(route)
        m.finished(route, "OK", 0.003)
        m.retried(route)
        m.ejected("inference", "127.0.0.1:5001")
        m.ring_changed("inference")
        url = f"http://{telemetry.prometheus.address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{telemetry.prometheus.address}/other", timeout=10)
        missing.value.close()
        assert missing.value.code == 404
    finally:
        telemetry.shutdown()
    common = 'destination="inference/v2",model_version="2",route="inference-0"'
    assert "# TYPE meshserve_requests counter" in text
    assert f'meshserve_requests_total{{{common},status="OK"}} 1' in text
    assert "# TYPE meshserve_request_duration_seconds histogram" in text
    assert (
        f'meshserve_request_duration_seconds_bucket{{{common},status="OK",le="0.0025"}} 0' in text
    )
    assert f'meshserve_request_duration_seconds_bucket{{{common},status="OK",le="0.005"}} 1' in text
    assert f'meshserve_request_duration_seconds_bucket{{{common},status="OK",le="+Inf"}} 1' in text
    assert f'meshserve_request_duration_seconds_count{{{common},status="OK"}} 1' in text
    assert f"meshserve_requests_in_flight{{{common}}} 0" in text
    assert f"meshserve_retries_total{{{common}}} 1" in text
    assert (
        'meshserve_outlier_ejections_total{destination="inference",endpoint="127.0.0.1:5001"} 1'
        in text
    )
    assert 'meshserve_ring_changes_total{destination="inference"} 1' in text


def test_log_filter_outside_a_span() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert TraceIdFilter().filter(record)
    assert (record.trace_id, record.span_id) == ("-", "-")  # type: ignore[attr-defined]


def test_otlp_without_the_optional_package_names_it() -> None:
    try:
        importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    except ImportError:
        pass
    else:
        pytest.skip("the OTLP exporter is installed here")
    from mesh.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="opentelemetry-exporter-otlp-proto-grpc"):
        setup(TelemetrySettings(traces="otlp"))


def test_install_shows_ids_in_the_handler_format() -> None:
    import io

    from mesh.telemetry.logs import install

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    install(handler, show_ids=True)
    install(handler, show_ids=True)  # idempotent
    telemetry = setup(TelemetrySettings(traces="memory"))
    logger = logging.getLogger("test.ids")
    logger.addHandler(handler)
    try:
        with telemetry.tracer.start_as_current_span("op") as span:
            logger.warning("inside")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
        telemetry.shutdown()
    inside, outside = stream.getvalue().splitlines()
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert inside.startswith("WARNING inside [trace=") and trace_id in inside
    assert outside == "WARNING outside [trace=- span=-]"
