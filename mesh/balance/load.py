"""In-flight request counts per endpoint and per hash key, the balancers' mutable input."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class LoadTracker:
    """Counts requests in flight. One per proxy; only touched from the event loop thread."""

    __slots__ = ("_by_endpoint", "_by_key")

    def __init__(self) -> None:
        self._by_endpoint: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()

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
