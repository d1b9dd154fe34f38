"""``up``'s janitor thread sweeps long-dead instance documents from a real store."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cli.supervision.janitor import Janitor
from registry.connect import StoreSettings
from registry.embedded import EmbeddedStore
from registry.instances import Instance
from registry.lease import Registration
from registry.schema import ensure_schema
from registry.store import open_store


async def _register(settings: StoreSettings, name: str, beat: datetime) -> None:
    async with open_store(settings, deadline_s=10) as store:
        await ensure_schema(store.es, store.indices)
        instance = Instance("inference", name, "127.0.0.1:9")
        await Registration(
            store.es, store.indices, instance, ttl=5, interval=1, clock=lambda: beat
        ).register()


async def _ids(settings: StoreSettings) -> list[str]:
    async with open_store(settings, deadline_s=10) as store:
        await store.es.indices.refresh(index=store.indices.instances)
        found = await store.es.search(index=store.indices.instances, query={"match_all": {}})
        return sorted(hit["_id"] for hit in found["hits"]["hits"])


def test_janitor_sweeps_dead_documents_until_stopped(tmp_path: Path) -> None:
    with EmbeddedStore(tmp_path / "es", advertise=False) as store:
        settings = StoreSettings.from_env(url=store.url, prefix=f"t{uuid.uuid4().hex[:12]}")
        now = datetime.now(UTC)
        asyncio.run(_register(settings, "dead", now - timedelta(hours=2)))
        asyncio.run(_register(settings, "recent", now - timedelta(seconds=30)))
        janitor = Janitor(settings, retention=timedelta(hours=1), interval_s=0.2)
        janitor.start()
        try:
            deadline = time.monotonic() + 30
            while (ids := asyncio.run(_ids(settings))) != ["recent"]:
                assert time.monotonic() < deadline, ids
                time.sleep(0.2)
        finally:
            janitor.stop()
        assert not janitor.running


def test_a_janitor_stopped_before_it_started_leaves_nothing_running() -> None:
    janitor = Janitor(StoreSettings.from_env(url="http://127.0.0.1:9"))
    janitor.stop()
    assert not janitor.running
