"""The warm cache: LRU eviction under a memory budget, reload on demand, shared loads, deadlines."""

from __future__ import annotations

import asyncio

import pytest

from mesh.errors import Unavailable
from workers.inference.cache import ModelCache

Key = tuple[str, int]


class Loader:
    """Loads 'weights' of a size chosen per key; counts loads; can be held back."""

    def __init__(self, sizes: dict[Key, int]) -> None:
        self.sizes = sizes
        self.calls: list[Key] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, key: Key) -> tuple[Key, int]:
        self.calls.append(key)
        await self.gate.wait()
        if self.sizes[key] < 0:
            raise RuntimeError("corrupt file")
        return key, self.sizes[key]


def cache_for(loader: Loader, budget: int) -> tuple[ModelCache[Key, tuple[Key, int]], list[Key]]:
    evicted: list[Key] = []
    cache: ModelCache[Key, tuple[Key, int]] = ModelCache(
        loader, lambda v: v[1], budget, lambda k, _: evicted.append(k)
    )
    return cache, evicted


async def test_budget_evicts_least_recently_used_and_reloads_on_demand() -> None:
    loader = Loader({("a", 1): 40, ("b", 1): 40, ("c", 1): 40})
    cache, evicted = cache_for(loader, budget=100)
    await cache.get(("a", 1))
    await cache.get(("b", 1))
    await cache.get(("a", 1))  # a is now the most recently used
    await cache.get(("c", 1))
    assert evicted == [("b", 1)]
    assert cache.loaded_keys() == [("a", 1), ("c", 1)]
    assert cache.used_bytes == 80
    await cache.get(("b", 1))  # reloaded on demand, evicting the LRU (a)
    assert loader.calls.count(("b", 1)) == 2
    assert evicted == [("b", 1), ("a", 1)]
    assert cache.used_bytes <= 100


async def test_a_value_over_the_budget_is_kept_alone() -> None:
    loader = Loader({("small", 1): 10, ("huge", 1): 500})
    cache, evicted = cache_for(loader, budget=100)
    await cache.get(("small", 1))
    assert await cache.get(("huge", 1)) == (("huge", 1), 500)
    assert cache.loaded_keys() == [("huge", 1)] and evicted == [("small", 1)]


async def test_concurrent_gets_of_a_cold_key_share_one_load() -> None:
    loader = Loader({("a", 1): 1})
    loader.gate.clear()
    cache, _ = cache_for(loader, budget=0)
    waiters = [asyncio.create_task(cache.get(("a", 1))) for _ in range(5)]
    while not loader.calls:  # poll: the load has started
        await asyncio.sleep(0)
    assert cache.is_loading(("a", 1))
    loader.gate.set()
    results = await asyncio.gather(*waiters)
    assert loader.calls == [("a", 1)]
    assert all(r == (("a", 1), 1) for r in results)


async def test_waiting_past_the_deadline_is_unavailable_and_the_load_goes_on() -> None:
    loader = Loader({("a", 1): 1})
    loader.gate.clear()
    cache, _ = cache_for(loader, budget=0)
    with pytest.raises(Unavailable, match=r"model 'a' version 1 is still loading"):
        await cache.get(("a", 1), timeout=0.01)
    loader.gate.set()
    assert await cache.get(("a", 1), timeout=5) == (("a", 1), 1)
    assert loader.calls == [("a", 1)]  # the timed-out wait did not cancel the load


async def test_a_failed_load_reaches_every_waiter_and_is_retried_next_time() -> None:
    loader = Loader({("a", 1): -1})
    cache, _ = cache_for(loader, budget=0)
    with pytest.raises(RuntimeError, match="corrupt"):
        await cache.get(("a", 1))
    assert not cache.is_loading(("a", 1)) and not cache.is_loaded(("a", 1))
    loader.sizes[("a", 1)] = 3
    assert await cache.get(("a", 1)) == (("a", 1), 3)
