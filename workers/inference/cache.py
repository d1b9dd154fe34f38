"""An LRU of loaded model versions bounded by a memory budget, with shared on-demand loads."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from mesh.errors import Unavailable

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ModelCache(Generic[K, V]):
    """Keeps loaded values under ``budget_bytes`` (0: unbounded), evicting least recently used.

    Concurrent ``get`` calls for a key that is not loaded share one load. The load runs
    as its own task: a caller whose deadline passes gives up waiting, but the load goes
    on for the next caller. A single value larger than the budget is still kept (the
    worker must serve it) and everything else is evicted around it.
    """

    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        size_of: Callable[[V], int],
        budget_bytes: int = 0,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self._load = load
        self._size_of = size_of
        self.budget_bytes = budget_bytes
        self._on_evict = on_evict
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, asyncio.Task[V]] = {}
        self.loads = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(self._size_of(v) for v in self._entries.values())

    def loaded_keys(self) -> list[K]:
        """Loaded keys, least recently used first."""
        return list(self._entries)

    def peek(self, key: K) -> V | None:
        """The loaded value for ``key`` without loading it or touching the LRU order."""
        return self._entries.get(key)

    def values(self) -> list[V]:
        return list(self._entries.values())

    def is_loaded(self, key: K) -> bool:
        return key in self._entries

    def is_loading(self, key: K) -> bool:
        return key in self._loading

    async def get(self, key: K, timeout: float | None = None) -> V:
        """The value for ``key``, loading it if needed; waits at most ``timeout`` seconds.

        Raises :class:`Unavailable` when the load does not finish in time, and the
        load's own error when it fails.
        """
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            return value
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load_and_insert(key))
            self._loading[key] = task
        try:
            # shield: one caller's timeout or cancellation must not cancel the shared load.
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise Unavailable(f"{_describe(key)} is still loading; try again later") from None

    async def _load_and_insert(self, key: K) -> V:
        try:
            value = await self._load(key)
        finally:
            self._loading.pop(key, None)
        self.loads += 1
        existing = self._entries.get(key)
        if existing is not None:
            # A reload was installed with put() while this load ran: the newer one wins.
            self._entries.move_to_end(key)
            return existing
        self._entries[key] = value
        self._entries.move_to_end(key)
        self._enforce_budget(keep=key)
        return value

    def _enforce_budget(self, keep: K) -> None:
        if not self.budget_bytes:
            return
        while self.used_bytes > self.budget_bytes:
            victim = next((k for k in self._entries if k != keep), None)
            if victim is None:
                log.warning(
                    "%s alone exceeds the memory budget of %d bytes; keeping it",
                    _describe(keep),
                    self.budget_bytes,
                )
                return
            self.evict(victim)

    def put(self, key: K, value: V) -> None:
        """Installs an already loaded ``value`` (e.g. a reload), replacing any previous one."""
        self.evict(key)
        self._entries[key] = value
        self._enforce_budget(keep=key)

    def evict(self, key: K) -> bool:
        """Drops ``key`` if loaded; in-flight users keep their reference until done."""
        value = self._entries.pop(key, None)
        if value is None:
            return False
        self.evictions += 1
        log.info("evicted %s", _describe(key))
        if self._on_evict is not None:
            self._on_evict(key, value)
        return True


def _describe(key: object) -> str:
    if isinstance(key, tuple) and len(key) == 2:
        return f"model {key[0]!r} version {key[1]}"
    return repr(key)
