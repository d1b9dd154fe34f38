"""Log records that carry the current trace and span ids, so logs and traces join up."""

from __future__ import annotations

import logging

from opentelemetry import trace

#: A format that shows them: ``%(trace_id)s`` is 32 hex digits or "-".
LOG_FORMAT = "%(levelname)s %(name)s [trace=%(trace_id)s span=%(span_id)s] %(message)s"


class TraceIdFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` to every record (``-`` outside a span).

    Install on a handler (``handler.addFilter(TraceIdFilter())``) so records from every
    logger pass through it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = "-"
            record.span_id = "-"
        return True


#: Appended to a handler's format by ``install(show_ids=True)``.
IDS_SUFFIX = " [trace=%(trace_id)s span=%(span_id)s]"


def install(handler: logging.Handler | None = None, *, show_ids: bool = False) -> None:
    """Adds the filter to ``handler`` (default: every handler of the root logger), once.

    With ``show_ids`` the handler's format also prints the ids (processes that trace turn
    it on, so a log line leads to its trace).
    """
    handlers = [handler] if handler is not None else list(logging.getLogger().handlers)
    for h in handlers:
        if not any(isinstance(f, TraceIdFilter) for f in h.filters):
            h.addFilter(TraceIdFilter())
            if show_ids:
                fmt = h.formatter._fmt if h.formatter is not None else None
                h.setFormatter(logging.Formatter((fmt or "%(name)s: %(message)s") + IDS_SUFFIX))
