"""Routing configuration versions: apply with optimistic concurrency, validate, watch."""

from __future__ import annotations

import asyncio

import pytest
from elasticsearch import AsyncElasticsearch

from mesh.errors import Aborted, InvalidArgument, NotFound
from registry.config_store import ConfigStore
from registry.schema import Indices

VS = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n"


def reject_empty(text: str) -> None:
    if not text.strip():
        raise ValueError("empty configuration")


async def test_apply_numbers_versions_and_checks_expectations(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    store = ConfigStore(es, indices, validator=reject_empty)
    assert await store.current() is None
    v1 = await store.apply(VS, expected_version=0, applied_by="alice")
    assert (v1.version, v1.applied_by) == (1, "alice")
    assert await store.apply(VS) == v1  # identical text: no new version
    v2 = await store.apply(VS + "# tweak\n", expected_version=1)
    with pytest.raises(Aborted, match="version 2, not the expected 1"):
        await store.apply(VS + "# stale edit\n", expected_version=1)
    with pytest.raises(InvalidArgument, match="empty configuration"):
        await store.apply("  ")
    assert await store.current() == v2
    assert await store.get(1) == v1
    with pytest.raises(NotFound, match="version 7"):
        await store.get(7)


async def test_two_writers_on_the_same_version_one_wins(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    await ConfigStore(es, indices).apply(VS)
    writers = [ConfigStore(es, indices) for _ in range(2)]
    results = await asyncio.gather(
        *(w.apply(VS + f"# writer {i}\n", expected_version=1) for i, w in enumerate(writers)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Aborted) for r in results) == 1
    assert [v.version for v in await writers[0].history()] == [1, 2]


async def test_watch_yields_each_new_version_in_order(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    store = ConfigStore(es, indices)
    await store.apply(VS)
    stream = store.watch(interval=0.05)
    try:
        first = await asyncio.wait_for(anext(stream), 10)
        assert first.version == 1
        for i in range(2, 5):
            await store.apply(VS + f"# {i}\n")
        got = [(await asyncio.wait_for(anext(stream), 10)).version for _ in range(3)]
        assert got == [2, 3, 4]
    finally:
        await stream.aclose()


async def test_config_names_are_independent(es: AsyncElasticsearch, indices: Indices) -> None:
    await ConfigStore(es, indices, name="routing").apply(VS)
    other = ConfigStore(es, indices, name="security")
    assert await other.current() is None
    assert (await other.apply(VS)).version == 1
