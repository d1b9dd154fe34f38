"""The mesh's metrics: one place that names every instrument and its attributes."""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    Sum,
)

Attributes = Mapping[str, str | int]

#: Latency buckets in seconds: sub-millisecond proxy hops up to slow training calls.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


#: The request metrics (OTel names; Prometheus: ``meshserve_requests_total``,
#: ``meshserve_request_duration_seconds``, ``meshserve_requests_in_flight``).
REQUESTS = "meshserve.requests"
REQUESTS_HELP = "Completed requests by final status"
DURATION = "meshserve.request.duration"
DURATION_HELP = "Request latency, first byte in to status out"
IN_FLIGHT = "meshserve.requests.in_flight"
IN_FLIGHT_HELP = "Requests being served now"


def labels(
    *,
    route: str | None = None,
    destination: str | None = None,
    model_version: str | None = None,
    method: str | None = None,
    status: str | None = None,
) -> dict[str, str]:
    """Attributes in one spelling everywhere (absent ones are left out, not empty)."""
    found = {
        "route": route,
        "destination": destination,
        "model_version": model_version,
        "rpc_method": method,
        "status": status,
    }
    return {k: v for k, v in found.items() if v is not None}


_Key = frozenset[tuple[str, str | int]]
#: Label sets kept per metric, as the SDK's default cardinality limit: client-chosen
#: values (a method path, a model version) must not grow memory without bound.
CARDINALITY_LIMIT = 2000
#: Where calls beyond the limit are counted (the SDK's own overflow series).
OVERFLOW: _Key = frozenset({("otel.metric.overflow", True)})


class _Latency:
    """One series of the latency histogram: explicit-bucket counts, sum, min and max."""

    __slots__ = ("buckets", "count", "max", "min", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf


class RequestTally:
    """Request count, latency and in-flight, aggregated per label set in plain Python.

    Handing each call to the OpenTelemetry SDK (``Counter.add``/``Histogram.record`` with
    an attribute dict) cleans and hashes the attributes on every call, three instruments
    per call: the largest per-call cost left on the relay's path (bench.relay_cpu). Here a
    call costs a dict lookup and a few additions under a lock; a metric reader asks for
    :meth:`metrics` when it collects (mesh/telemetry/setup.py merges them into what the
    SDK collected; in-flight is an observable instrument reading :meth:`in_flight`), so names, units, labels and buckets are what the SDK's instruments
    would have exported. Cumulative, as Prometheus reads them.
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._start_ns = clock_ns()
        # Written from the event loop, read from a scrape or export thread.
        self._lock = threading.Lock()
        self._in_flight: dict[_Key, int] = {}
        self._done: dict[_Key, _Latency] = {}

    def _flight(self, attributes: Attributes, delta: int) -> None:
        key = frozenset(attributes.items())
        # Series are never dropped, so a label set over the limit at its start is
        # still over it at its end: both land on the overflow series.
        if key not in self._in_flight and len(self._in_flight) >= CARDINALITY_LIMIT:
            key = OVERFLOW
        self._in_flight[key] = self._in_flight.get(key, 0) + delta

    def started(self, attributes: Attributes) -> None:
        with self._lock:
            self._flight(attributes, 1)

    def abandoned(self, attributes: Attributes) -> None:
        with self._lock:
            self._flight(attributes, -1)

    def finished(self, attributes: Attributes, done: Attributes, seconds: float) -> None:
        series_key = frozenset(done.items())
        with self._lock:
            self._flight(attributes, -1)
            series = self._done.get(series_key)
            if series is None:
                if len(self._done) >= CARDINALITY_LIMIT:
                    series_key = OVERFLOW
                series = self._done.get(series_key)
                if series is None:
                    series = self._done[series_key] = _Latency()
            # OTel's explicit buckets: bucket i holds bounds[i-1] < v <= bounds[i].
            series.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            series.count += 1
            series.sum += seconds
            if seconds < series.min:
                series.min = seconds
            if seconds > series.max:
                series.max = seconds

    def in_flight(self, options: CallbackOptions) -> list[Observation]:
        """In-flight per label set: the callback of an observable up-down counter.

        An SDK instrument, so that once a call has started a push reader always finds
        something to export (it exports nothing at all when the SDK collected nothing,
        which would leave the merged request metrics unsent)."""
        with self._lock:
            flight = list(self._in_flight.items())
        return [Observation(n, dict(key)) for key, n in flight]

    def metrics(self) -> list[Metric]:
        """Request count and latency as the SDK's cumulative instruments would export them."""
        now = self._clock_ns()
        start = self._start_ns
        with self._lock:
            done = [
                (key, s.count, s.sum, list(s.buckets), s.min, s.max)
                for key, s in self._done.items()
            ]
        counts = [NumberDataPoint(dict(key), start, now, count) for key, count, *_ in done]
        latencies = [
            HistogramDataPoint(
                dict(key), start, now, count, total, buckets, LATENCY_BUCKETS, low, high
            )
            for key, count, total, buckets, low, high in done
        ]
        cumulative = AggregationTemporality.CUMULATIVE
        found = [
            Metric(REQUESTS, REQUESTS_HELP, "1", Sum(counts, cumulative, is_monotonic=True)),
            Metric(DURATION, DURATION_HELP, "s", Histogram(latencies, cumulative)),
        ]
        # As the SDK does, an instrument with no series yet is left out.
        return [m for m in found if m.data.data_points]


class MeshMetrics:
    """Instruments for proxies (gateway, sidecar) and servers.

    Names follow Prometheus conventions once exported (``meshserve_requests_total``,
    ``meshserve_request_duration_seconds``...). Attributes: ``route`` (the VirtualService
    rule), ``destination`` (host/subset), ``model_version``, ``rpc_method``, ``status``.

    The per-call request metrics go to ``tally`` (plain Python, read when a reader
    collects); without one (no metrics exporter configured, so nothing would ever read
    them) they are not kept at all. The rare events (retries, ejections, ring changes)
    are the SDK's own counters.
    """

    def __init__(self, meter: Meter, tally: RequestTally | None = None) -> None:
        self.tally = tally
        if tally is not None:
            meter.create_observable_up_down_counter(
                IN_FLIGHT, callbacks=[tally.in_flight], unit="1", description=IN_FLIGHT_HELP
            )
        self.retries = meter.create_counter(
            "meshserve.retries", unit="1", description="Attempts after the first"
        )
        self.ejections = meter.create_counter(
            "meshserve.outlier.ejections",
            unit="1",
            description="Endpoints ejected by outlier detection",
        )
        self.overflows = meter.create_counter(
            "meshserve.overflows",
            unit="1",
            description="Circuit breaker overflows (DestinationRule connectionPool) by limit",
        )
        self.ring_changes = meter.create_counter(
            "meshserve.ring.changes",
            unit="1",
            description="Hash rings rebuilt on membership change",
        )

    def started(self, attributes: Attributes) -> None:
        if self.tally is not None:
            self.tally.started(attributes)

    def finished(
        self,
        attributes: Attributes,
        status: str,
        seconds: float,
        learned: Attributes | None = None,
    ) -> None:
        """Ends a request begun with :meth:`started` (same ``attributes``).

        ``learned`` are labels known only once the request was routed (route,
        destination): they go on the request count and latency, not on in-flight, which
        must be decremented with the labels it was incremented with.
        """
        if self.tally is not None:
            done = {**attributes, **(learned or {}), "status": status}
            self.tally.finished(attributes, done, seconds)

    def abandoned(self, attributes: Attributes) -> None:
        """Ends a request begun with :meth:`started` that another hop records instead."""
        if self.tally is not None:
            self.tally.abandoned(attributes)

    def retried(self, attributes: Attributes, count: int = 1) -> None:
        self.retries.add(count, attributes)

    def ejected(self, destination: str, endpoint: str) -> None:
        self.ejections.add(1, {"destination": destination, "endpoint": endpoint})

    def overflowed(self, destination: str, limit: str) -> None:
        """``limit``: connections, pending, retries or requests (mesh/routing/circuit.py)."""
        self.overflows.add(1, {"destination": destination, "limit": limit})

    def ring_changed(self, destination: str) -> None:
        self.ring_changes.add(1, {"destination": destination})
