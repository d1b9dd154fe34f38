"""The moment at which a watcher judges leases: the wall clock, paused across store outages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

#: The longest outage a watcher forgives; instances silent for longer are dropped after it.
DEFAULT_MAX_CREDIT = timedelta(minutes=5)


@dataclass
class LeaseClock:
    """Pure: turns "now" into the time leases are judged at.

    While the store is unreachable every heartbeat fails too, so on recovery every lease
    would look expired and a watcher would drop every endpoint at once. Like etcd, which
    extends all leases when a new leader takes over, the lease clock stands still during an
    outage: the first read after it judges leases at the time of the last good read, and the
    lease clock then runs at double speed until it has caught up with the wall clock (after
    as long as the outage lasted). Instances whose heartbeats resume stay; instances that
    died meanwhile are removed once the clock passes their expiry.
    """

    max_credit: timedelta = DEFAULT_MAX_CREDIT
    _last_good: datetime | None = field(default=None, init=False)
    _failing: bool = field(default=False, init=False)
    _recovered: datetime | None = field(default=None, init=False)
    _credit: timedelta = field(default=timedelta(0), init=False)

    def judge_at(self, now: datetime) -> datetime:
        if self._failing and self._last_good is not None:
            return max(self._last_good, now - self.max_credit)
        if self._recovered is not None:
            remaining = self._credit - (now - self._recovered)
            if remaining > timedelta(0):
                return now - remaining
        return now

    def read_failed(self) -> None:
        self._failing = True

    def read_succeeded(self, now: datetime) -> None:
        """Record a good read made with ``judge_at(now)``."""
        if self._failing and self._last_good is not None:
            self._credit = min(now - self._last_good, self.max_credit)
            self._recovered = now
        self._failing = False
        self._last_good = now
