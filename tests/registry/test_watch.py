"""The Elasticsearch watcher: reset/add/change/remove as instances come, change and go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from elasticsearch import AsyncElasticsearch

from registry.connect import StoreSettings
from registry.embedded import free_port
from registry.instances import Instance, Status
from registry.lease import Registration
from registry.schema import Indices
from registry.watch import ElasticWatcher, Update, UpdateKind


async def next_update(stream: AsyncIterator[Update], timeout: float = 10.0) -> Update:
    return await asyncio.wait_for(anext(stream), timeout)


async def test_watch_yields_reset_add_change_remove(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    first = Registration(es, indices, Instance("data", "d1", "h:1"), ttl=5, interval=1)
    await first.register()
    watcher = ElasticWatcher(es, indices, service="data", interval=0.1)
    stream = watcher.updates()
    try:
        reset = await next_update(stream)
        assert reset.kind is UpdateKind.RESET
        assert [i.instance_id for i in reset.instances] == ["d1"]

        async with Registration(es, indices, Instance("data", "d2", "h:2"), ttl=5, interval=1):
            added = await next_update(stream)
            assert (added.kind, added.instance.instance_id) == (UpdateKind.ADD, "d2")

            await first.update(status=Status.DRAINING)
            changed = await next_update(stream)
            assert (changed.kind, changed.instance.instance_id) == (UpdateKind.CHANGE, "d1")
            assert changed.instance.status is Status.DRAINING

        removed = await next_update(stream)
        assert (removed.kind, removed.instance.instance_id) == (UpdateKind.REMOVE, "d2")
        assert list(watcher.snapshot()) == ["d1"]
        assert watcher.healthy() and watcher.staleness() == 0.0
    finally:
        await stream.aclose()
        await first.deregister()


async def test_other_services_are_not_reported(es: AsyncElasticsearch, indices: Indices) -> None:
    watcher = ElasticWatcher(es, indices, service="data", interval=0.1)
    async with Registration(es, indices, Instance("inference", "i1", "h:1"), ttl=5, interval=1):
        assert await watcher.poll() == [Update(UpdateKind.RESET, ())]
        assert await watcher.poll() == []


class Stop(Exception):
    """Ends an otherwise endless watch loop from the injected sleep."""


async def test_unreachable_store_backs_off_and_reports_staleness() -> None:
    """A real client to a closed port: reads fail, the set is kept, staleness follows the clock."""
    client = StoreSettings(f"http://127.0.0.1:{free_port()}", request_timeout=1.0).client()
    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds
        if len(slept) == 6:
            raise Stop

    watcher = ElasticWatcher(
        client,
        Indices("nowhere"),
        interval=1.0,
        monotonic=lambda: now[0],
        sleep=fake_sleep,
    )
    try:
        with pytest.raises(Stop):
            async for _ in watcher.updates():
                pytest.fail("nothing can be read from a closed port")
    finally:
        await client.close()
    assert slept == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # exponential, capped
    assert watcher.failures == 6 and not watcher.healthy()
    assert watcher.staleness() == pytest.approx(35.0)  # since the watch started
    assert watcher.snapshot() == {}
