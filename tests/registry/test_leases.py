"""Registration, heartbeats, lease expiry, deregistration and the janitor, on a real store."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from elasticsearch import AsyncElasticsearch

from mesh.errors import AlreadyExists
from registry.directory import read_live, sweep_dead
from registry.instances import Instance, Load, ModelRef, Status, to_document, with_lease
from registry.lease import Registration
from registry.schema import REFRESH_INTERVAL, Indices
from registry.watch import ElasticWatcher
from tests.registry.conftest import eventually

TTL = 2.5
BEAT = 0.5
WATCH = 0.2


def worker(i: str = "w1", service: str = "inference") -> Instance:
    return Instance(service, i, f"127.0.0.1:{9000 + len(i)}", labels={"version": "v1"})


async def test_registered_instance_is_live_and_readable(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    async with Registration(es, indices, worker(), ttl=TTL, interval=BEAT) as reg:
        await reg.update(models=(ModelRef("resnet", "2"),), load=Load(in_flight=3))
        snap = await read_live(es, indices, datetime.now(UTC), service="inference")
        assert list(snap.instances) == ["w1"]
        # update() publishes at once with refresh=False; the search sees it after a refresh.
        await es.indices.refresh(index=indices.instances)
        got = (await read_live(es, indices, datetime.now(UTC))).instances["w1"]
        assert got.models == (ModelRef("resnet", "2"),) and got.load.in_flight == 3
        assert (await read_live(es, indices, datetime.now(UTC), service="other")).instances == {}


async def test_lease_expiry_is_judged_by_the_readers_clock(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    reg = Registration(es, indices, worker(), ttl=5.0, interval=1.0, clock=lambda: t0)
    await reg.register()
    before = await read_live(es, indices, t0 + timedelta(seconds=4.999))
    after = await read_live(es, indices, t0 + timedelta(seconds=5))
    assert list(before.instances) == ["w1"]
    assert after.instances == {}


async def test_stopped_heartbeats_drop_the_instance_within_ttl_plus_interval(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    reg = Registration(es, indices, worker(), ttl=TTL, interval=BEAT)
    watcher = ElasticWatcher(es, indices, interval=WATCH)
    registered = await reg.register()
    reg.start()
    await watcher.poll()
    assert "w1" in watcher.snapshot()

    async def renewed() -> bool:
        await watcher.poll()
        seen = watcher.snapshot().get("w1")
        assert registered.expires_at is not None
        return (
            seen is not None
            and seen.expires_at is not None
            and (seen.expires_at > registered.expires_at)
        )

    assert await eventually(renewed, timeout=TTL)  # heartbeats extend the lease
    await reg.stop_heartbeats()  # a crash, as far as the store can tell: no delete

    async def gone() -> bool:
        await watcher.poll()
        return "w1" not in watcher.snapshot()

    assert not await gone()  # the lease, not a delete, decides
    # The last heartbeat may need one refresh to become visible; slack covers a loaded CI box.
    assert await eventually(gone, timeout=TTL + WATCH + REFRESH_INTERVAL + 2.0)


async def test_clean_deregister_is_visible_at_once(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    async with Registration(es, indices, worker(), ttl=TTL, interval=BEAT):
        assert "w1" in (await read_live(es, indices, datetime.now(UTC))).instances
    assert (await read_live(es, indices, datetime.now(UTC))).instances == {}


async def test_a_live_instance_id_cannot_be_registered_twice(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    async with Registration(es, indices, worker(), ttl=TTL, interval=BEAT):
        with pytest.raises(AlreadyExists, match="w1"):
            await Registration(es, indices, worker(), ttl=TTL, interval=BEAT).register()


async def test_a_dead_instance_id_is_taken_over(es: AsyncElasticsearch, indices: Indices) -> None:
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    dead = Registration(es, indices, worker(), ttl=5, interval=1, clock=lambda: long_ago)
    await dead.register()
    replacement = Instance("inference", "w1", "127.0.0.1:9999")
    new = Registration(es, indices, replacement, ttl=TTL, interval=BEAT)
    await new.register()
    live = (await read_live(es, indices, datetime.now(UTC))).instances
    assert live["w1"].address == "127.0.0.1:9999"
    await new.deregister()


async def test_janitor_deletes_only_long_dead_documents(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    now = datetime.now(UTC)
    for name, beat in (("old", now - timedelta(hours=2)), ("recent", now - timedelta(minutes=1))):

        def at(moment: datetime = beat) -> datetime:
            return moment

        await Registration(es, indices, worker(name), ttl=5, interval=1, clock=at).register()
    async with Registration(es, indices, worker("alive"), ttl=TTL, interval=BEAT):
        deleted = await sweep_dead(es, indices, now, retention=timedelta(hours=1))
        assert deleted == 1
        remaining = await es.search(index=indices.instances, query={"match_all": {}})
        assert sorted(h["_id"] for h in remaining["hits"]["hits"]) == ["alive", "recent"]


async def test_malformed_document_is_skipped_with_a_warning(
    es: AsyncElasticsearch, indices: Indices, caplog: pytest.LogCaptureFixture
) -> None:
    good = with_lease(worker("good"), datetime.now(UTC), timedelta(minutes=5))
    bad = to_document(with_lease(worker("bad"), datetime.now(UTC), timedelta(minutes=5)))
    bad["status"] = "ON_FIRE"  # a valid keyword to Elasticsearch, not a Status to us
    await es.index(index=indices.instances, id="good", document=to_document(good))
    await es.index(index=indices.instances, id="bad", document=bad, refresh=True)
    watcher = ElasticWatcher(es, indices)
    with caplog.at_level(logging.WARNING, logger="registry.directory"):
        await watcher.poll()
    assert list(watcher.snapshot()) == ["good"]
    assert watcher.skipped == 1
    assert "ON_FIRE" in caplog.text and "'bad'" in caplog.text


async def test_status_changes_are_published(es: AsyncElasticsearch, indices: Indices) -> None:
    async with Registration(es, indices, worker(), ttl=TTL, interval=BEAT) as reg:
        await reg.update(status=Status.DRAINING)
        await es.indices.refresh(index=indices.instances)
        live = (await read_live(es, indices, datetime.now(UTC))).instances
        assert live["w1"].status is Status.DRAINING


async def test_heartbeat_recreates_a_document_removed_behind_its_back(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    async with Registration(es, indices, worker(), ttl=TTL, interval=BEAT):
        await es.delete(index=indices.instances, id="w1", refresh=True)

        async def back() -> bool:
            return "w1" in (await read_live(es, indices, datetime.now(UTC))).instances

        assert await eventually(back, timeout=TTL + REFRESH_INTERVAL + 2.0)
