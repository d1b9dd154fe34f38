"""The store's process stops and returns: watchers keep the last known good set, then recover."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch

from registry.connect import StoreSettings
from registry.embedded import EmbeddedStore
from registry.instances import Instance
from registry.lease import Registration
from registry.schema import Indices, ensure_schema
from registry.watch import ElasticWatcher, UpdateKind
from tests.registry.conftest import eventually


@pytest.fixture
async def own_store(tmp_path: Path) -> AsyncIterator[EmbeddedStore]:
    """A dedicated noida process this test may stop and restart (same data dir and port)."""
    store = EmbeddedStore(tmp_path / "store", advertise=False)
    async with store:
        yield store


async def test_watch_keeps_last_known_good_and_recovers(own_store: EmbeddedStore) -> None:
    client: AsyncElasticsearch = StoreSettings(own_store.url, request_timeout=2.0).client()
    indices = Indices("lkg")
    try:
        await ensure_schema(client, indices)
        # A long TTL: the instance stays alive across the outage, as with Consul's TTL checks.
        reg = Registration(client, indices, Instance("svc", "a", "h:1"), ttl=60, interval=0.2)
        await reg.register()
        reg.start()
        watcher = ElasticWatcher(client, indices, interval=0.1)
        assert [u.kind for u in await watcher.poll() or []] == [UpdateKind.RESET]
        assert list(watcher.snapshot()) == ["a"]

        await own_store.__aexit__(None, None, None)  # SIGTERM: noida saves and exits

        async def stale() -> bool:
            return await watcher.poll() is None and watcher.staleness() > 0.2

        assert await eventually(stale, timeout=10)
        assert list(watcher.snapshot()) == ["a"]  # never emptied because of an error
        assert not watcher.healthy() and watcher.failures >= 2

        async def heartbeat_failed() -> bool:
            return reg.failures > 0

        assert await eventually(heartbeat_failed, timeout=5)

        await own_store.__aenter__()  # same data dir, same port

        async def recovered() -> bool:
            return await watcher.poll() is not None

        assert await eventually(recovered, timeout=10)
        assert list(watcher.snapshot()) == ["a"] and watcher.healthy()
        assert watcher.staleness() == 0.0

        async def heartbeats_resumed() -> bool:
            return reg.failures == 0

        assert await eventually(heartbeats_resumed, timeout=5)

        # And it keeps watching: a newcomer after the outage is an ADD.
        async with Registration(client, indices, Instance("svc", "b", "h:2"), ttl=60, interval=1):
            updates = await watcher.poll()
            assert updates is not None
            assert [(u.kind, u.instance.instance_id) for u in updates] == [(UpdateKind.ADD, "b")]
        await reg.deregister()
    finally:
        await client.close()


async def test_an_outage_longer_than_the_ttl_drops_only_the_dead(
    own_store: EmbeddedStore,
) -> None:
    """Every heartbeat fails while the store is down; on recovery, live workers must stay."""
    ttl, beat = 2.0, 0.3
    client: AsyncElasticsearch = StoreSettings(own_store.url, request_timeout=2.0).client()
    indices = Indices("outage")
    survivor = Registration(
        client, indices, Instance("svc", "alive", "h:1"), ttl=ttl, interval=beat
    )
    victim = Registration(client, indices, Instance("svc", "dies", "h:2"), ttl=ttl, interval=beat)
    try:
        await ensure_schema(client, indices)
        for reg in (survivor, victim):
            await reg.register()
            reg.start()
        watcher = ElasticWatcher(client, indices, interval=0.1)
        await watcher.poll()
        assert sorted(watcher.snapshot()) == ["alive", "dies"]

        await own_store.__aexit__(None, None, None)
        await victim.stop_heartbeats()  # this one dies during the outage

        async def outage_outlived_the_leases() -> bool:
            await watcher.poll()
            return watcher.staleness() > ttl + 1.0

        assert await eventually(outage_outlived_the_leases, timeout=15)
        await own_store.__aenter__()

        removed: list[str] = []

        async def victim_removed() -> bool:
            updates = await watcher.poll() or []
            removed.extend(u.instance.instance_id for u in updates if u.kind is UpdateKind.REMOVE)
            return "dies" in removed

        assert await eventually(victim_removed, timeout=20)
        assert removed == ["dies"]  # the survivor was never dropped
        assert list(watcher.snapshot()) == ["alive"]
    finally:
        await survivor.deregister()
        await client.close()
