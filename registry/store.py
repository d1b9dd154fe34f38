"""One handle on a mesh's discovery store: a connected client, its indices, and factories."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from elasticsearch import AsyncElasticsearch

from registry.catalog import Catalog
from registry.config_store import DEFAULT_NAME, ConfigStore, Validator, accept_any
from registry.connect import StoreSettings, connect
from registry.instances import Instance
from registry.jobs import DEFAULT_CLAIM_TTL, ElasticJobClaims, ElasticJobStore
from registry.lease import Registration
from registry.schema import Indices, ensure_schema
from registry.watch import ElasticWatcher


@dataclass(frozen=True)
class Store:
    """What a process needs from the registry; every factory shares the one client."""

    es: AsyncElasticsearch
    indices: Indices

    def registration(self, instance: Instance, **options: Any) -> Registration:
        """``async with store.registration(instance):`` keeps ``instance`` registered."""
        return Registration(self.es, self.indices, instance, **options)

    def watcher(self, service: str | None = None, **options: Any) -> ElasticWatcher:
        return ElasticWatcher(self.es, self.indices, service=service, **options)

    def catalog(self, **options: Any) -> Catalog:
        return Catalog(self.es, self.indices, **options)

    def config(self, name: str = DEFAULT_NAME, validator: Validator = accept_any) -> ConfigStore:
        return ConfigStore(self.es, self.indices, name=name, validator=validator)

    def jobs(self) -> ElasticJobStore:
        return ElasticJobStore(self.es, self.indices)

    def job_claims(self, owner: str, ttl: float = DEFAULT_CLAIM_TTL) -> ElasticJobClaims:
        """Leases on jobs held as ``owner`` (one training worker process)."""
        return ElasticJobClaims(self.es, self.indices, owner, ttl=ttl)


@asynccontextmanager
async def open_store(settings: StoreSettings, *, deadline_s: float = 30.0) -> AsyncIterator[Store]:
    """Connects (retrying with backoff up to ``deadline_s``), ensures the schema, closes on exit.

    Raises ``mesh.errors.Unavailable`` naming the URL when the store never answers.
    """
    es = await connect(settings, deadline_s=deadline_s)
    try:
        indices = Indices(settings.prefix)
        await ensure_schema(es, indices)
        yield Store(es, indices)
    finally:
        await es.close()
