"""Routing configuration versions: apply with optimistic concurrency, validate, watch."""

from __future__ import annotations

import asyncio

import pytest
from elasticsearch import AsyncElasticsearch

from mesh.errors import Aborted, InvalidArgument, NotFound, Unavailable
from registry.config_store import STORE_DEADLINE_S, ConfigStore
from registry.connect import StoreSettings
from registry.embedded import free_port
from registry.schema import Indices
from tests.registry.test_deadlines import frozen_url  # noqa: F401  (fixture)

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


async def test_a_store_that_is_down_or_frozen_is_unavailable_naming_the_config_store(
    frozen_url: str,  # noqa: F811
) -> None:
    """`meshserve apply` reaches the gateway, whose store is restarting (refused) or frozen
    (SIGSTOP): UNAVAILABLE saying so, before the CLI's own 10 s deadline."""
    down = StoreSettings(f"http://127.0.0.1:{free_port()}", request_timeout=30).client()
    frozen = StoreSettings(frozen_url, request_timeout=30).client()
    try:
        with pytest.raises(Unavailable, match=r"^the config store is unreachable: "):
            await ConfigStore(down, Indices("down")).apply(VS)
        with pytest.raises(Unavailable) as frozen_out:
            await ConfigStore(frozen, Indices("frozen")).apply(VS)
        assert frozen_out.value.message == (
            f"the config store did not answer within {STORE_DEADLINE_S:g} s"
        )
    finally:
        await down.close()
        await frozen.close()
