"""Which ModelInfer responses carry the worker's load report: a pure decision with a clock.

The sidecar reads the report from ServerReady (mesh/sidecar/load.py), which always
carries it. On ModelInfer it was built, converted and HPACK-encoded into every
response's trailers for readers that look at it only now and then (a client or test
that inspects a call's trailers); issue 17 measured the request path, and per-request
work that no one needs per request goes. A response carries the report when what it
says about the loaded versions changed since the last one that carried it, or when
``interval_s`` has passed: a reader sees every change of the loaded set and fresh
load figures at least that often, at a cost that no longer grows with the request rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

#: Fresh in-flight and queue figures at least this often on a busy ModelInfer stream.
DEFAULT_INTERVAL_S = 0.05


class ReportSampler:
    """Says, per response, whether it carries the load report."""

    def __init__(
        self, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._last_at = float("-inf")
        self._last_state: Hashable = None

    def due(self, state: Hashable) -> bool:
        """True when this response carries the report; ``state``: what the loaded set is."""
        now = self._clock()
        if state == self._last_state and now - self._last_at < self.interval_s:
            return False
        self._last_state, self._last_at = state, now
        return True
