"""Per-client token buckets: a steady rate with bursts, answering how long to back off."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mesh.errors import InvalidArgument

Clock = Callable[[], float]


@dataclass(frozen=True)
class RateLimit:
    """``rate`` tokens per second refill a bucket of ``burst`` tokens; a request takes one."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise InvalidArgument(f"rate limit: requestsPerSecond must be > 0, got {self.rate}")
        if self.burst < 1:
            raise InvalidArgument(f"rate limit: burst must be >= 1, got {self.burst}")


class TokenBucket:
    """A token bucket on an injected monotonic clock (seconds). Starts full."""

    def __init__(self, limit: RateLimit, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        # A clock that steps back must not mint or destroy tokens.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.limit.burst), self._tokens + elapsed * self.limit.rate)
        self._updated = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def take(self, cost: float = 1.0) -> float:
        """Takes ``cost`` tokens and returns 0, or takes none and returns the seconds to wait.

        The wait is exact for this bucket: after it, the same request would pass (if no
        other request took the tokens meanwhile). A cost above the burst can never pass
        and returns ``math.inf``.
        """
        if cost > self.limit.burst:
            return math.inf
        self._refill()
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.limit.rate

    @property
    def full(self) -> bool:
        return self.tokens >= self.limit.burst


class RateLimiter:
    """One bucket per client, created on first use, with per-client overrides.

    At most ``max_clients`` buckets are kept; past that, full (idle) buckets are dropped
    first — a full bucket is what a new one would be, so dropping it changes nothing —
    then the least recently used.
    """

    def __init__(
        self,
        default: RateLimit | None,
        overrides: dict[str, RateLimit] | None = None,
        *,
        clock: Clock = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        self.default = default
        self.overrides = dict(overrides or {})
        self._clock = clock
        self._max = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def limit_for(self, client: str) -> RateLimit | None:
        return self.overrides.get(client, self.default)

    def take(self, client: str, cost: float = 1.0) -> float:
        """0 when ``client`` may proceed, else the seconds it should wait."""
        limit = self.limit_for(client)
        if limit is None:
            return 0.0
        bucket = self._buckets.get(client)
        if bucket is None:
            self._evict()
            bucket = self._buckets[client] = TokenBucket(limit, self._clock)
        else:
            self._buckets.move_to_end(client)
        return bucket.take(cost)

    def _evict(self) -> None:
        if len(self._buckets) < self._max:
            return
        for name in [n for n, b in self._buckets.items() if b.full]:
            del self._buckets[name]
        while len(self._buckets) >= self._max:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
