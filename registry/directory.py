"""Reading the live instances (unexpired leases) and sweeping long-dead documents."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from elasticsearch import AsyncElasticsearch

from registry.connect import Sleep
from registry.instances import (
    Instance,
    MalformedDocument,
    WallClock,
    format_time,
    from_document,
    is_live,
)
from registry.schema import Indices

log = logging.getLogger(__name__)

#: One search reads the whole membership; a mesh of more instances needs search_after paging.
MAX_INSTANCES = 10_000
#: Documents whose lease ended this long ago are deleted by the janitor.
DEFAULT_RETENTION = timedelta(hours=1)


@dataclass(frozen=True)
class Snapshot:
    """One read of the membership: live instances by id, plus how many documents were bad."""

    instances: dict[str, Instance]
    skipped: int


def live_query(now: datetime, service: str | None = None) -> dict[str, Any]:
    """Live leases, evaluated with the reader's clock so tests can inject time."""
    filters: list[dict[str, Any]] = [{"range": {"expires_at": {"gt": format_time(now)}}}]
    if service is not None:
        filters.append({"term": {"service": service}})
    return {"bool": {"filter": filters}}


def decode_hits(hits: list[dict[str, Any]], now: datetime) -> Snapshot:
    """Decodes search hits, skipping (and logging) malformed ones; pure."""
    instances: dict[str, Instance] = {}
    skipped = 0
    for hit in hits:
        try:
            instance = from_document(hit.get("_source") or {})
        except MalformedDocument as exc:
            skipped += 1
            log.warning("skipping malformed instance document %r: %s", hit.get("_id"), exc)
            continue
        # Re-checked here: the range query ran on the server's copy, with millisecond dates.
        if is_live(instance, now):
            instances[instance.instance_id] = instance
    return Snapshot(instances, skipped)


async def read_live(
    es: AsyncElasticsearch, indices: Indices, now: datetime, service: str | None = None
) -> Snapshot:
    """The instances whose lease is alive at ``now``."""
    response = await es.search(
        index=indices.instances,
        query=live_query(now, service),
        size=MAX_INSTANCES,
        ignore_unavailable=True,
    )
    return decode_hits(response["hits"]["hits"], now)


async def read_all(es: AsyncElasticsearch, indices: Indices) -> list[dict[str, Any]]:
    """Every instance document, live or not (for ``meshserve status``)."""
    response = await es.search(
        index=indices.instances,
        query={"match_all": {}},
        size=MAX_INSTANCES,
        sort=[{"service": "asc"}, {"instance_id": "asc"}],
        ignore_unavailable=True,
    )
    return list(response["hits"]["hits"])


async def sweep_dead(
    es: AsyncElasticsearch,
    indices: Indices,
    now: datetime,
    retention: timedelta = DEFAULT_RETENTION,
) -> int:
    """Deletes documents whose lease ended more than ``retention`` ago; returns the count."""
    response = await es.delete_by_query(
        index=indices.instances,
        query={"range": {"expires_at": {"lt": format_time(now - retention)}}},
        conflicts="proceed",  # a heartbeat racing the sweep wins; that instance is alive
        refresh=True,
        ignore_unavailable=True,
    )
    return int(response.get("deleted", 0))


async def run_janitor(
    es: AsyncElasticsearch,
    indices: Indices,
    clock: WallClock,
    *,
    retention: timedelta = DEFAULT_RETENTION,
    interval: float = 60.0,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Sweeps forever; several janitors may run at once (delete_by_query is idempotent)."""
    while True:
        try:
            deleted = await sweep_dead(es, indices, clock(), retention)
            if deleted:
                log.info("janitor removed %d dead instance documents", deleted)
        except Exception as exc:
            log.warning("janitor sweep failed: %s", exc)
        await sleep(interval)
