"""Traces and request metrics for calls the relay forwards itself.

The same span and metrics a gRPC server hop records (``mesh.telemetry.interceptors``):
a SERVER span per call, parented by the caller's ``traceparent``, annotated with the
route, destination, hash key, endpoint and retry count, and the parent of the upstream
call; ``meshserve.requests``/``request.duration``/``requests.in_flight`` with the route
and destination learned while routing.
"""

from __future__ import annotations

import time

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span

from mesh.proxy.hpack_codec import Header
from mesh.routing.decision import RouteDecision
from mesh.telemetry.interceptors import annotate, finish_span, server_span
from mesh.telemetry.metrics import labels
from mesh.telemetry.propagation import TRACEPARENT, TRACESTATE, inject
from mesh.telemetry.setup import Telemetry

#: Trace headers the relay replaces with its own span's on the upstream call.
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE})
_TRACE_HEADER_BYTES = frozenset(h.encode() for h in TRACE_HEADERS)


class CallRecord:
    """One call's span and metric labels, from its first frame to its status."""

    __slots__ = ("labels", "passed", "routed", "span", "started")

    def __init__(
        self, span: Span, metric_labels: dict[str, str], passed: list[Header] | None = None
    ) -> None:
        self.span = span
        self.labels = metric_labels
        #: Not tracing: the caller's own trace headers, passed on to the upstream as sent.
        self.passed = passed
        #: Labels learned while routing (route, destination): on the count and latency.
        self.routed: dict[str, str] = {}
        self.started = time.perf_counter()


class RelayTelemetry:
    """What the relay records about a call, kept apart from its forwarding logic."""

    def __init__(self, telemetry: Telemetry) -> None:
        # Without a trace exporter no span is ever seen: a no-op tracer then passes the
        # caller's trace context on unchanged (the upstream's parent is the caller's
        # span, not one never exported), and spares the relay most of what telemetry
        # costs it per call (bench.relay_cpu).
        # Not tracing, the relay skips the span altogether: it only looks for the
        # caller's trace headers, to pass them on untouched, and the model version label
        # (no metadata decode, no context extract or inject per call).
        self._tracing = telemetry.settings.traces != "none"
        self._tracer = telemetry.tracer if self._tracing else trace.NoOpTracer()
        self._metrics = telemetry.metrics

    @staticmethod
    def records(telemetry: Telemetry) -> bool:
        """Whether anything would see what the relay records per call: a trace exporter
        (spans) or a metrics reader (the request tally). With neither, as ``up`` runs
        its sidecars, a record per call only built label dicts nobody read and moved the
        caller's trace headers, which the relay then forwards as they came."""
        return telemetry.settings.traces != "none" or telemetry.metrics.tally is not None

    def start(self, path: str, headers: list[Header], request_id: str | None) -> CallRecord:
        if not self._tracing:
            passed: list[Header] = []
            version = None
            for name, value in headers:
                if name in _TRACE_HEADER_BYTES:
                    passed.append((name, value))
                elif name == b"x-model-version" and value:
                    version = value.decode("latin-1")
            metric_labels = labels(method=path, model_version=version)
            self._metrics.started(metric_labels)
            return CallRecord(trace.INVALID_SPAN, metric_labels, passed)
        metadata = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in headers
            if n[:1] != b":" and not n.endswith(b"-bin")
        ]
        span, metric_labels = server_span(self._tracer, path, metadata, None, request_id)
        self._metrics.started(metric_labels)
        return CallRecord(span, metric_labels)

    def routed(self, record: CallRecord, decision: RouteDecision) -> None:
        record.routed = labels(route=decision.route, destination=decision.target)
        if record.passed is not None:
            return
        annotate(
            record.span,
            route=decision.route,
            destination=decision.target,
            hash_key=decision.hash_key.key if decision.hash_key else None,
        )

    def attempt(self, record: CallRecord, endpoint: str, attempt: int) -> list[Header]:
        """Annotates the attempt; returns the trace headers for its upstream call."""
        if record.passed is not None:
            return record.passed
        annotate(record.span, endpoint=endpoint, retry_count=attempt)
        carrier = inject((), trace.set_span_in_context(record.span))
        return [(k.encode(), v.encode() if isinstance(v, str) else v) for k, v in carrier]

    def finish(self, record: CallRecord, code: grpc.StatusCode, message: str | None) -> None:
        if record.passed is None:
            finish_span(record.span, code, message)
            record.span.end()
        self._metrics.finished(
            record.labels, code.name, time.perf_counter() - record.started, record.routed
        )

    def abandon(self, record: CallRecord) -> None:
        """The call went to the gateway's gRPC server, which records it itself: no span
        (it is never ended, so never exported) and no count here."""
        self._metrics.abandoned(record.labels)
