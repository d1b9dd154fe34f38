"""In-flight request counts per endpoint and per hash key, the balancers' mutable input."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

#: Endpoints remembered per key, and keys remembered, for warm-first spilling.
WARM_PER_KEY = 4
WARM_KEYS = 65536


class LoadTracker:
    """Counts requests in flight. One per proxy; only touched from the event loop thread."""

    __slots__ = ("_by_endpoint", "_by_key", "_warm")

    def __init__(self) -> None:
        self._by_endpoint: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        # key -> endpoints it was last sent to, most recent last: where its weights are
        # likely still loaded. Bounded: least recently used keys are forgotten.
        self._warm: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def warm(self, key: str) -> tuple[str, ...]:
        """Endpoints ``key`` was recently sent to (most recent last)."""
        return self._warm.get(key, ())

    def in_flight(self, address: str) -> int:
        return self._by_endpoint[address]

    def key_in_flight(self, key: str) -> int:
        return self._by_key[key]

    def total(self, addresses: Iterable[str]) -> int:
        counts = self._by_endpoint
        return sum(counts[a] for a in addresses) if counts else 0

    def start(self, address: str, key: str | None = None) -> None:
        self._by_endpoint[address] += 1
        if key is not None:
            self._by_key[key] += 1
            seen = self._warm.pop(key, ())
            if address not in seen:
                seen = (*seen, address)[-WARM_PER_KEY:]
            self._warm[key] = seen
            if len(self._warm) > WARM_KEYS:
                self._warm.popitem(last=False)

    def finish(self, address: str, key: str | None = None) -> None:
        self._by_endpoint[address] -= 1
        if self._by_endpoint[address] <= 0:
            del self._by_endpoint[address]
        if key is not None:
            self._by_key[key] -= 1
            if self._by_key[key] <= 0:
                del self._by_key[key]

    @contextmanager
    def track(self, address: str, key: str | None = None) -> Iterator[None]:
        self.start(address, key)
        try:
            yield
        finally:
            self.finish(address, key)
