"""A Prometheus scrape endpoint over an SDK metric reader: text exposition, stdlib HTTP server."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    MetricsData,
    Sum,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def metric_name(metric: Metric) -> str:
    """OTel name → Prometheus name: dots to underscores, unit suffix, as the OTel spec maps."""
    name = _INVALID.sub("_", metric.name)
    suffix = _UNIT_SUFFIX.get(metric.unit or "")
    if suffix and not name.endswith(suffix):
        name = f"{name}_{suffix}"
    return name


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(attributes: Mapping[str, Any] | None, extra: Mapping[str, str] | None = None) -> str:
    # Attributes sorted for stable output; ``le`` last, as Prometheus' own clients write it.
    pairs = sorted((_INVALID.sub("_", k), str(v)) for k, v in (attributes or {}).items())
    pairs += list((extra or {}).items())
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _lines(metric: Metric) -> Iterator[str]:
    name = metric_name(metric)
    data = metric.data
    if metric.description:
        yield f"# HELP {name} {metric.description}"
    if isinstance(data, Sum) and data.is_monotonic:
        total = name if name.endswith("_total") else f"{name}_total"
        yield f"# TYPE {name} counter"
        for point in data.data_points:
            yield f"{total}{_labels(point.attributes)} {_number(point.value)}"
    elif isinstance(data, Sum | Gauge):
        yield f"# TYPE {name} gauge"
        for point in data.data_points:
            yield f"{name}{_labels(point.attributes)} {_number(point.value)}"
    elif isinstance(data, Histogram):
        yield f"# TYPE {name} histogram"
        for hpoint in data.data_points:
            cumulative = 0
            for bound, count in zip(
                (*hpoint.explicit_bounds, math.inf), hpoint.bucket_counts, strict=True
            ):
                cumulative += count
                le = {"le": _number(float(bound))}
                yield f"{name}_bucket{_labels(hpoint.attributes, le)} {cumulative}"
            yield f"{name}_sum{_labels(hpoint.attributes)} {_number(hpoint.sum)}"
            yield f"{name}_count{_labels(hpoint.attributes)} {hpoint.count}"


def exposition(data: MetricsData | None) -> str:
    """The text format of every metric in ``data``."""
    out: list[str] = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.extend(_lines(metric))
    return "\n".join(out) + "\n"


class PrometheusServer:
    """Serves ``GET /metrics`` from ``reader`` on a background thread."""

    def __init__(
        self, reader: InMemoryMetricReader, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._reader = reader

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler) -> None:
                if handler.path.split("?")[0] != "/metrics":
                    handler.send_error(404, "only /metrics is served here")
                    return
                body = exposition(reader.get_metrics_data()).encode()
                handler.send_response(200)
                handler.send_header("Content-Type", CONTENT_TYPE)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, format: str, *args: Any) -> None:
                log.debug("prometheus scrape: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(
                f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror}"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="prometheus-scrape", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
