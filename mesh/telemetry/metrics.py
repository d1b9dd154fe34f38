"""The mesh's metrics: one place that names every instrument and its attributes."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.metrics import Meter

Attributes = Mapping[str, str | int]

#: Latency buckets in seconds: sub-millisecond proxy hops up to slow training calls.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


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


class MeshMetrics:
    """Instruments for proxies (gateway, sidecar) and servers.

    Names follow Prometheus conventions once exported (``meshserve_requests_total``,
    ``meshserve_request_duration_seconds``...). Attributes: ``route`` (the VirtualService
    rule), ``destination`` (host/subset), ``model_version``, ``rpc_method``, ``status``.
    """

    def __init__(self, meter: Meter) -> None:
        self.requests = meter.create_counter(
            "meshserve.requests", unit="1", description="Completed requests by final status"
        )
        self.latency = meter.create_histogram(
            "meshserve.request.duration",
            unit="s",
            description="Request latency, first byte in to status out",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.in_flight = meter.create_up_down_counter(
            "meshserve.requests.in_flight", unit="1", description="Requests being served now"
        )
        self.retries = meter.create_counter(
            "meshserve.retries", unit="1", description="Attempts after the first"
        )
        self.ejections = meter.create_counter(
            "meshserve.outlier.ejections",
            unit="1",
            description="Endpoints ejected by outlier detection",
        )
        self.ring_changes = meter.create_counter(
            "meshserve.ring.changes",
            unit="1",
            description="Hash rings rebuilt on membership change",
        )

    def started(self, attributes: Attributes) -> None:
        self.in_flight.add(1, attributes)

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
        self.in_flight.add(-1, attributes)
        done = {**attributes, **(learned or {}), "status": status}
        self.requests.add(1, done)
        self.latency.record(seconds, done)

    def retried(self, attributes: Attributes, count: int = 1) -> None:
        self.retries.add(count, attributes)

    def ejected(self, destination: str, endpoint: str) -> None:
        self.ejections.add(1, {"destination": destination, "endpoint": endpoint})

    def ring_changed(self, destination: str) -> None:
        self.ring_changes.add(1, {"destination": destination})
