"""One embedded store per test session (or $MESHSERVE_ES_URL), one index prefix per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from elasticsearch import AsyncElasticsearch, NotFoundError

from registry.connect import ES_URL_ENV, StoreSettings
from registry.embedded import EmbeddedStore
from registry.schema import Indices, ensure_schema


@pytest.fixture(scope="session")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real cluster when $MESHSERVE_ES_URL is set, else one noida-db for the session."""
    url = os.environ.get(ES_URL_ENV)
    if url:
        yield url
        return
    with EmbeddedStore(tmp_path_factory.mktemp("es-store"), advertise=False) as store:
        yield store.url


@pytest.fixture
async def es(store_url: str) -> AsyncIterator[AsyncElasticsearch]:
    client = StoreSettings.from_env(url=store_url).client()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def indices(es: AsyncElasticsearch) -> AsyncIterator[Indices]:
    """A fresh prefix per test: tests never see each other's documents."""
    created = Indices(f"t{uuid.uuid4().hex[:12]}")
    await ensure_schema(es, created)
    try:
        yield created
    finally:
        await drop(es, created)


async def drop(es: AsyncElasticsearch, indices: Indices) -> None:
    """Removes a test's indices and templates (matters on a shared, real cluster)."""
    await es.indices.delete(index=",".join(indices.all()), ignore_unavailable=True)
    for name in indices.all():
        with contextlib.suppress(NotFoundError):
            await es.indices.delete_index_template(name=name)


async def eventually(
    predicate: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.05
) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
