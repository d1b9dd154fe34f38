"""The Elasticsearch watcher: reset/add/change/remove as instances come, change and go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from elasticsearch import AsyncElasticsearch

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
