"""One event-loop timer for every call's attempt deadline on a relay.

Every routed call arms a timeout (the route's, or its per-try timeout) and nearly every
call ends long before it, so the timer is cancelled. With one ``loop.call_later`` per
call that was an ``asyncio.TimerHandle`` made, pushed on the loop's heap and cancelled
per call, and the loop's heap filled with cancelled handles it had to sift past and
periodically rebuild. Here a call's deadline is a small entry on the relay's own heap and
the loop holds one timer, for the earliest deadline: deadlines of one route only grow,
so arming almost never touches the loop. Deadlines fire exactly when they would have
with ``call_later`` (the loop's own timer, at the earliest one, with the loop's clock
resolution as slack).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Cancelled entries tolerated on the heap before it is compacted (then: when they are
#: over half of it, as asyncio does with its own timer heap).
_COMPACT_AFTER = 64


class Deadline:
    """One armed deadline: cancel it as a ``TimerHandle`` is cancelled."""

    __slots__ = ("callback", "queue")

    def __init__(self, callback: Callable[[], None], queue: DeadlineQueue) -> None:
        self.callback: Callable[[], None] | None = callback
        self.queue = queue

    def cancel(self) -> None:
        if self.callback is not None:
            # Dropped at once: a finished call is not kept alive by its old deadline.
            self.callback = None
            self.queue.cancelled_one()


class DeadlineQueue:
    """Deadlines on one loop, served by one ``TimerHandle`` for the earliest of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = 0
        self._cancelled = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        # What asyncio allows a timer to run early by (BaseEventLoop._clock_resolution).
        self._slack = time.get_clock_info("monotonic").resolution

    def __len__(self) -> int:
        """Deadlines armed and not cancelled."""
        return len(self._heap) - self._cancelled

    def call_later(self, delay: float, callback: Callable[[], None]) -> Deadline:
        when = self._loop.time() + delay
        entry = Deadline(callback, self)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, entry))
        if when < self._armed_at:
            self._arm(when)
        return entry

    def cancelled_one(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > _COMPACT_AFTER and 2 * self._cancelled > len(heap):
            self._heap = [item for item in heap if item[2].callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def close(self) -> None:
        """Cancels the loop's timer (the deadlines are forgotten)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_at = math.inf
        self._heap, self._cancelled = [], 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = math.inf
        due = self._loop.time() + self._slack
        heap = self._heap
        while heap and heap[0][0] <= due:
            entry = heapq.heappop(heap)[2]
            callback = entry.callback
            if callback is None:
                self._cancelled -= 1
                continue
            entry.callback = None
            try:
                callback()
            except Exception:  # as the loop would for its own handle: log, go on
                log.exception("deadline callback %r failed", callback)
        while heap and heap[0][2].callback is None:
            heapq.heappop(heap)
            self._cancelled -= 1
        if heap:
            self._arm(heap[0][0])
