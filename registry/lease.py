"""Registering an instance: create, heartbeat a lease on an interval, deregister on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from types import TracebackType

from elasticsearch import AsyncElasticsearch, ConflictError, NotFoundError

from mesh.errors import AlreadyExists, InvalidArgument
from registry.connect import Sleep
from registry.instances import (
    Instance,
    Load,
    ModelRef,
    Status,
    WallClock,
    from_document,
    is_live,
    to_document,
    utc_now,
    with_lease,
)
from registry.schema import REFRESH_INTERVAL, Indices

log = logging.getLogger(__name__)

DEFAULT_TTL = 5.0
DEFAULT_HEARTBEAT_INTERVAL = 1.0


class Registration:
    """Keeps one instance registered while it lives (Consul's TTL check, etcd's lease).

    ``async with Registration(es, indices, instance):`` registers with ``op_type=create`` (a
    live instance with the same id is an ``AlreadyExists`` error; a dead one is taken over),
    heartbeats every ``interval`` seconds extending the lease to now + ``ttl``, and deletes
    the document on exit so readers drop it at once rather than after the TTL.
    """

    def __init__(
        self,
        es: AsyncElasticsearch,
        indices: Indices,
        instance: Instance,
        *,
        ttl: float = DEFAULT_TTL,
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        clock: WallClock = utc_now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if interval <= 0 or ttl <= 0:
            raise InvalidArgument("heartbeat interval and lease TTL must be positive")
        if interval >= ttl:
            # A lease must survive at least one late heartbeat.
            raise InvalidArgument(f"heartbeat interval {interval}s must be below the TTL {ttl}s")
        if interval + REFRESH_INTERVAL >= ttl:
            # Heartbeats become searchable only after the index refreshes.
            log.warning(
                "lease TTL %.1fs is not above heartbeat interval %.1fs + refresh interval "
                "%.1fs: readers may see %s flap",
                ttl,
                interval,
                REFRESH_INTERVAL,
                instance.instance_id,
            )
        self._es = es
        self._index = indices.instances
        self._instance = instance.without_lease()
        self._ttl = timedelta(seconds=ttl)
        self._interval = interval
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self.failures = 0  # consecutive failed heartbeats, for health reporting

    @property
    def instance(self) -> Instance:
        """What the next heartbeat writes (without lease timestamps)."""
        return self._instance

    async def register(self) -> Instance:
        """Creates the document; takes over a dead one with the same id."""
        stored = with_lease(self._instance, self._clock(), self._ttl)
        try:
            await self._es.index(
                index=self._index,
                id=stored.instance_id,
                document=to_document(stored),
                op_type="create",
                refresh=True,
            )
        except ConflictError:
            await self._take_over(stored)
        self._instance = replace(self._instance, registered_at=stored.registered_at)
        return stored

    async def _take_over(self, stored: Instance) -> None:
        current = await self._es.get(index=self._index, id=stored.instance_id)
        try:
            alive = is_live(from_document(current["_source"]), self._clock())
        except ValueError:
            alive = False  # a malformed leftover is as good as dead
        if alive:
            raise AlreadyExists(
                f"instance {stored.instance_id!r} is already registered with a live lease; "
                "pick another instance id or wait for its lease to expire"
            )
        try:
            # Compare-and-set: two processes taking over the same dead id cannot both win.
            await self._es.index(
                index=self._index,
                id=stored.instance_id,
                document=to_document(stored),
                if_seq_no=current["_seq_no"],
                if_primary_term=current["_primary_term"],
                refresh=True,
            )
        except ConflictError as exc:
            raise AlreadyExists(
                f"instance {stored.instance_id!r} was registered concurrently by another process"
            ) from exc

    async def heartbeat(self) -> None:
        """Extends the lease (and publishes the current status, models and load)."""
        async with self._write_lock:
            stored = with_lease(self._instance, self._clock(), self._ttl)
            # A plain index (upsert): if the janitor removed us after an outage, we come back.
            await self._es.index(
                index=self._index, id=stored.instance_id, document=to_document(stored)
            )

    async def update(
        self,
        *,
        status: Status | None = None,
        models: tuple[ModelRef, ...] | None = None,
        load: Load | None = None,
        labels: Mapping[str, str] | None = None,
        publish: bool = True,
    ) -> None:
        """Changes what is advertised; ``publish`` writes now instead of at the next beat."""
        instance = self._instance
        if status is not None:
            instance = replace(instance, status=status)
        if models is not None:
            instance = replace(instance, models=models)
        if load is not None:
            instance = replace(instance, load=load)
        if labels is not None:
            instance = replace(instance, labels=labels)
        self._instance = instance
        if publish:
            await self.heartbeat()

    def start(self) -> None:
        """Starts the heartbeat task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._beat(), name=f"heartbeat:{self._instance}")

    async def _beat(self) -> None:
        while True:
            await self._sleep(self._interval)
            try:
                await self.heartbeat()
                if self.failures:
                    log.info("heartbeat of %s recovered", self._instance.instance_id)
                self.failures = 0
            except Exception as exc:
                # Keep beating: the store may come back before our lease runs out.
                self.failures += 1
                log.warning(
                    "heartbeat of %s failed (%d in a row): %s",
                    self._instance.instance_id,
                    self.failures,
                    exc,
                )

    async def stop_heartbeats(self) -> None:
        """Stops beating without deregistering: the lease then expires on its own."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def deregister(self) -> None:
        """Stops heartbeats and deletes the document, visible to readers at once."""
        await self.stop_heartbeats()
        async with self._write_lock:
            with contextlib.suppress(NotFoundError):
                await self._es.delete(
                    index=self._index, id=self._instance.instance_id, refresh=True
                )

    async def __aenter__(self) -> Registration:
        await self.register()
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.deregister()
        except Exception as error:
            # The lease will expire by itself; a failed delete must not mask the real exit.
            log.warning("could not deregister %s: %s", self._instance.instance_id, error)
