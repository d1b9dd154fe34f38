"""OpenTelemetry SDK providers and exporters, chosen by settings (flags or environment)."""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Tracer

from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.telemetry.metrics import MeshMetrics, RequestTally
from mesh.telemetry.prometheus import PrometheusServer

TRACE_EXPORTERS = ("none", "console", "otlp", "memory", "file")
METRIC_EXPORTERS = ("none", "console", "otlp", "memory", "prometheus")
INSTRUMENTATION = "meshserve"


@dataclass(frozen=True)
class TelemetrySettings:
    """What to export where. Validated on construction.

    ``traces``: none | console | otlp | memory | file (JSON lines at ``traces_file``).
    ``metrics``: any of none | console | otlp | memory | prometheus (several may be given:
    Prometheus scrape plus OTLP push is common). OTLP needs the optional package
    ``opentelemetry-exporter-otlp-proto-grpc`` and reads the standard
    ``OTEL_EXPORTER_OTLP_*`` variables.
    """

    service_name: str = "meshserve"
    instance_id: str | None = None
    traces: str = "none"
    traces_file: Path | None = None
    metrics: tuple[str, ...] = ()
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9464
    metric_interval_seconds: float = 10.0
    #: Batch span export off the request path (production); tests want it synchronous.
    batch: bool = True

    def __post_init__(self) -> None:
        if not self.service_name:
            raise InvalidArgument("telemetry: service_name must not be empty")
        if self.traces not in TRACE_EXPORTERS:
            raise InvalidArgument(
                f"telemetry: traces exporter {self.traces!r} is not one of {', '.join(TRACE_EXPORTERS)}"
            )
        if (self.traces == "file") != (self.traces_file is not None):
            raise InvalidArgument(
                "telemetry: the file traces exporter needs traces_file, and only it"
            )
        for name in self.metrics:
            if name not in METRIC_EXPORTERS:
                raise InvalidArgument(
                    f"telemetry: metrics exporter {name!r} is not one of {', '.join(METRIC_EXPORTERS)}"
                )
        if not 0 <= self.prometheus_port <= 65535:
            raise InvalidArgument(
                f"telemetry: prometheus port {self.prometheus_port} is out of range"
            )
        if self.metric_interval_seconds <= 0:
            raise InvalidArgument("telemetry: metric_interval_seconds must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> TelemetrySettings:
        """``OTEL_SERVICE_NAME``, ``MESHSERVE_TRACES`` (``file:PATH`` for the file exporter),
        ``MESHSERVE_METRICS`` (comma-separated), ``MESHSERVE_PROMETHEUS`` (``HOST:PORT``)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("OTEL_SERVICE_NAME"):
            values["service_name"] = env["OTEL_SERVICE_NAME"]
        traces = env.get("MESHSERVE_TRACES", "").strip()
        if traces.startswith("file:"):
            values["traces"], values["traces_file"] = "file", Path(traces[len("file:") :])
        elif traces:
            values["traces"] = traces
        if env.get("MESHSERVE_METRICS"):
            values["metrics"] = tuple(
                m.strip() for m in env["MESHSERVE_METRICS"].split(",") if m.strip()
            )
        if env.get("MESHSERVE_PROMETHEUS"):
            host, _, port = env["MESHSERVE_PROMETHEUS"].rpartition(":")
            if not port.isdigit():
                raise InvalidArgument(
                    f"MESHSERVE_PROMETHEUS must be HOST:PORT, got {env['MESHSERVE_PROMETHEUS']!r}"
                )
            values["prometheus_host"], values["prometheus_port"] = host or "127.0.0.1", int(port)
        values.update(overrides)
        return cls(**values)


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line (multi-process tests read these)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(
            json.dumps(json.loads(s.to_json()), separators=(",", ":")) + "\n" for s in spans
        )
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def with_tally(
    data: MetricsData | None, tally: RequestTally, resource: Resource
) -> MetricsData | None:
    """What the SDK collected plus the request metrics ``tally`` kept, in the mesh's scope."""
    extra = tally.metrics()
    if not extra:
        return data
    if data is None or not data.resource_metrics:
        scope = ScopeMetrics(InstrumentationScope(INSTRUMENTATION), extra, "")
        return MetricsData([ResourceMetrics(resource, [scope], "")])
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for i, found in enumerate(scopes):
        if found.scope.name == INSTRUMENTATION:
            scopes[i] = ScopeMetrics(found.scope, [*found.metrics, *extra], found.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(InstrumentationScope(INSTRUMENTATION), extra, ""))
    return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


class TallyMemoryReader(InMemoryMetricReader):
    """An in-memory reader (tests, the Prometheus scrape) that also reads the tally."""

    def __init__(self, tally: RequestTally, resource: Resource) -> None:
        super().__init__()
        self._tally = tally
        self._resource = resource

    def get_metrics_data(self) -> MetricsData | None:
        return with_tally(super().get_metrics_data(), self._tally, self._resource)


class TallyExporter(MetricExporter):
    """Wraps a push exporter (console, OTLP) so each export carries the tally too."""

    def __init__(self, inner: MetricExporter, tally: RequestTally, resource: Resource) -> None:
        # The reader asks the exporter for its temporality and aggregation preferences.
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._tally = tally
        self._resource = resource

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        data = with_tally(metrics_data, self._tally, self._resource) or metrics_data
        return self._inner.export(data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _optional(module: str, name: str, what: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise FailedPrecondition(
            f"{what} needs the optional package opentelemetry-exporter-otlp-proto-grpc "
            "(pip install opentelemetry-exporter-otlp-proto-grpc)"
        ) from exc


@dataclass
class Telemetry:
    """Providers built from settings, plus what tests and servers need to reach."""

    settings: TelemetrySettings
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    #: Set with the ``memory`` traces exporter.
    spans: InMemorySpanExporter | None = None
    #: Set with the ``memory`` metrics exporter.
    metric_reader: InMemoryMetricReader | None = None
    prometheus: PrometheusServer | None = None
    #: The request metrics' aggregate; None when no metrics exporter would read it.
    tally: RequestTally | None = None
    _metrics: MeshMetrics | None = field(default=None, repr=False)

    @property
    def tracer(self) -> Tracer:
        return self.tracer_provider.get_tracer(INSTRUMENTATION)

    @property
    def meter(self) -> Meter:
        return self.meter_provider.get_meter(INSTRUMENTATION)

    @property
    def metrics(self) -> MeshMetrics:
        if self._metrics is None:
            self._metrics = MeshMetrics(self.meter, self.tally)
        return self._metrics

    def install_global(self) -> None:
        """Makes these the process-wide providers (once per process; OTel refuses more)."""
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)

    def shutdown(self) -> None:
        """Flushes and stops exporters and the scrape endpoint."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.prometheus is not None:
            self.prometheus.close()


def setup(settings: TelemetrySettings) -> Telemetry:
    """Builds providers for ``settings`` (not global: see :meth:`Telemetry.install_global`)."""
    attributes: dict[str, str] = {SERVICE_NAME: settings.service_name}
    if settings.instance_id:
        attributes[SERVICE_INSTANCE_ID] = settings.instance_id
    resource = Resource.create(attributes)

    tracer_provider = TracerProvider(resource=resource)
    spans = None
    exporter: SpanExporter | None = None
    if settings.traces == "console":
        exporter = ConsoleSpanExporter()
    elif settings.traces == "otlp":
        exporter = _optional(
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
            "OTLPSpanExporter",
            "OTLP traces",
        )()
    elif settings.traces == "memory":
        exporter = spans = InMemorySpanExporter()
    elif settings.traces == "file":
        assert settings.traces_file is not None
        exporter = JsonLinesSpanExporter(settings.traces_file)
    if exporter is not None:
        # In-memory and file exports are for tests and tools: make spans visible at end().
        synchronous = not settings.batch or settings.traces in ("memory", "file")
        processor = SimpleSpanProcessor(exporter) if synchronous else BatchSpanProcessor(exporter)
        tracer_provider.add_span_processor(processor)

    readers: list[MetricReader] = []
    memory_reader = None
    prometheus = None
    interval_ms = settings.metric_interval_seconds * 1000
    # Request metrics are aggregated apart from the SDK (mesh/telemetry/metrics.py) and
    # only when some reader will read them.
    tally = RequestTally() if settings.metrics else None
    for name in settings.metrics:
        assert tally is not None
        if name == "console":
            console = TallyExporter(ConsoleMetricExporter(), tally, resource)
            readers.append(PeriodicExportingMetricReader(console, interval_ms))
        elif name == "otlp":
            otlp: MetricExporter = _optional(
                "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
                "OTLPMetricExporter",
                "OTLP metrics",
            )()
            readers.append(
                PeriodicExportingMetricReader(TallyExporter(otlp, tally, resource), interval_ms)
            )
        elif name == "memory":
            memory_reader = TallyMemoryReader(tally, resource)
            readers.append(memory_reader)
        elif name == "prometheus":
            scrape_reader = TallyMemoryReader(tally, resource)
            readers.append(scrape_reader)
            prometheus = PrometheusServer(
                scrape_reader, host=settings.prometheus_host, port=settings.prometheus_port
            )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(
        settings=settings,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        spans=spans,
        metric_reader=memory_reader,
        prometheus=prometheus,
        tally=tally,
    )
