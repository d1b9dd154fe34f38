"""W3C ``traceparent``/``tracestate`` carried in gRPC metadata, both directions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Metadata = Sequence[tuple[str, str | bytes]]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_PROPAGATOR = TraceContextTextMapPropagator()


class _MetadataGetter(Getter[Metadata]):
    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        # gRPC metadata keys are lower-case on the wire; several values may repeat a key.
        found = [v for k, v in carrier if k == key and isinstance(v, str)]
        return found or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


class _ListSetter(Setter[list[tuple[str, str | bytes]]]):
    def set(self, carrier: list[tuple[str, str | bytes]], key: str, value: str) -> None:
        carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value))


_GETTER = _MetadataGetter()
_SETTER = _ListSetter()


def extract(metadata: Metadata | None) -> Context:
    """The trace context a caller sent (an empty context when it sent none or garbage)."""
    return _PROPAGATOR.extract(metadata or (), getter=_GETTER)


def inject(
    metadata: Iterable[tuple[str, str | bytes]] | None = None, context: Context | None = None
) -> list[tuple[str, str | bytes]]:
    """``metadata`` plus the current (or given) span's ``traceparent``/``tracestate``.

    Any incoming ``traceparent`` is replaced: the proxy's own span is the parent of the
    next hop, so a trace shows every hop. Without a current span the metadata is returned
    as is, so a proxy that does not trace still passes its caller's context on.
    """
    context = context or otel_context.get_current()
    if not trace.get_current_span(context).get_span_context().is_valid:
        # Not tracing here: pass the caller's context through untouched.
        return list(metadata or ())
    carrier = [(k, v) for k, v in (metadata or ()) if k not in (TRACEPARENT, TRACESTATE)]
    _PROPAGATOR.inject(carrier, context=context, setter=_SETTER)
    return carrier


@contextmanager
def continued(metadata: Metadata | None) -> Iterator[None]:
    """Runs the block in the trace context a caller sent: calls made in it with
    :func:`inject` continue the caller's trace.

    For a worker that calls other services while serving a call (a training worker looks
    its dataset up in the data service): it records no spans of its own, so its sidecar's
    span is the parent of its outgoing calls, and one trace runs through every hop.
    """
    token = otel_context.attach(extract(metadata))
    try:
        yield
    finally:
        otel_context.detach(token)
