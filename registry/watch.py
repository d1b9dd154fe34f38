"""Watching membership: a pure diff, the Elasticsearch poller with last known good, an in-memory twin."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from elasticsearch import AsyncElasticsearch

from registry.connect import Clock, Sleep, backoff_delays
from registry.directory import read_live
from registry.instances import Instance, WallClock, is_live, utc_now
from registry.lease_clock import LeaseClock
from registry.schema import Indices

log = logging.getLogger(__name__)

DEFAULT_WATCH_INTERVAL = 1.0
#: Longest pause between reads while the store is unreachable.
MAX_BACKOFF = 10.0


class UpdateKind(enum.StrEnum):
    RESET = "reset"  # ``instances`` is the whole membership; forget what you had
    ADD = "add"
    REMOVE = "remove"
    CHANGE = "change"  # same instance id, different address/labels/status/models/load


@dataclass(frozen=True)
class Update:
    """One membership event. ``instances`` holds the whole set for RESET, else one instance."""

    kind: UpdateKind
    instances: tuple[Instance, ...]

    @property
    def instance(self) -> Instance:
        if len(self.instances) != 1:
            raise ValueError(f"a {self.kind} update of {len(self.instances)} instances")
        return self.instances[0]


def diff(old: Mapping[str, Instance], new: Mapping[str, Instance]) -> list[Update]:
    """Updates that turn ``old`` into ``new`` (keyed by instance id); heartbeats are no change.

    Order: removals, then changes, then additions, each by id, so output is deterministic.
    """
    updates = [Update(UpdateKind.REMOVE, (old[i],)) for i in sorted(old.keys() - new.keys())]
    updates += [
        Update(UpdateKind.CHANGE, (new[i],))
        for i in sorted(old.keys() & new.keys())
        if not old[i].same_endpoint(new[i])
    ]
    updates += [Update(UpdateKind.ADD, (new[i],)) for i in sorted(new.keys() - old.keys())]
    return updates


def apply(current: Mapping[str, Instance], update: Update) -> dict[str, Instance]:
    """The membership after ``update``; ``apply`` over ``diff(a, b)`` from ``a`` gives ``b``."""
    if update.kind is UpdateKind.RESET:
        return {i.instance_id: i for i in update.instances}
    result = dict(current)
    for instance in update.instances:
        if update.kind is UpdateKind.REMOVE:
            result.pop(instance.instance_id, None)
        else:
            result[instance.instance_id] = instance
    return result


class Discovery(Protocol):
    """What gateway and sidecars consume: a membership stream plus its freshness."""

    def updates(self) -> AsyncIterator[Update]:
        """A RESET with the current set first, then changes as they happen."""
        ...

    def snapshot(self) -> dict[str, Instance]:
        """The last known good membership."""
        ...

    def staleness(self) -> float:
        """Seconds since the membership was last confirmed (0 when fresh)."""
        ...


@dataclass
class ElasticWatcher:
    """Polls the live instances every ``interval`` seconds and yields what changed.

    When a read fails the last known good set stays (no endpoint is ever dropped because
    of an error), reads back off exponentially up to ``MAX_BACKOFF``, and ``staleness()``
    grows; when the store answers again the difference is yielded as usual, with leases
    judged by a ``LeaseClock`` that stood still during the outage (so endpoints whose
    heartbeats failed only because the store was down are not dropped on recovery).
    """

    es: AsyncElasticsearch
    indices: Indices
    service: str | None = None
    interval: float = DEFAULT_WATCH_INTERVAL
    clock: WallClock = utc_now
    monotonic: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep
    lease_clock: LeaseClock = field(default_factory=LeaseClock)
    _known: dict[str, Instance] = field(default_factory=dict, init=False)
    _last_good: float | None = field(default=None, init=False)
    _started: float = field(default=0.0, init=False)
    failures: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._started = self.monotonic()

    def snapshot(self) -> dict[str, Instance]:
        return dict(self._known)

    def staleness(self) -> float:
        reference = self._last_good if self._last_good is not None else self._started
        return 0.0 if self.failures == 0 else max(0.0, self.monotonic() - reference)

    def healthy(self) -> bool:
        """Whether the last read succeeded."""
        return self._last_good is not None and self.failures == 0

    async def poll(self) -> list[Update] | None:
        """One read: the updates since the last good read, or None when the read failed."""
        now = self.clock()
        try:
            snap = await read_live(
                self.es, self.indices, self.lease_clock.judge_at(now), self.service
            )
        except Exception as exc:
            self.failures += 1
            self.lease_clock.read_failed()
            log.warning(
                "discovery read failed (%d in a row, %.1fs stale); keeping %d known instances: %s",
                self.failures,
                self.staleness(),
                len(self._known),
                exc,
            )
            return None
        if self.failures:
            log.info("discovery store reachable again after %d failed reads", self.failures)
        first = self._last_good is None
        self.lease_clock.read_succeeded(now)
        self.failures = 0
        self.skipped = snap.skipped
        self._last_good = self.monotonic()
        if first:
            self._known = snap.instances
            return [
                Update(UpdateKind.RESET, tuple(snap.instances[i] for i in sorted(snap.instances)))
            ]
        updates = diff(self._known, snap.instances)
        self._known = snap.instances
        return updates

    async def updates(self) -> AsyncGenerator[Update, None]:
        delays = backoff_delays(self.interval, 2.0, max(MAX_BACKOFF, self.interval))
        while True:
            result = await self.poll()
            if result is None:
                # First failure waits one interval, then 2x, 4x, ... capped.
                await self.sleep(next(delays))
                continue
            delays = backoff_delays(self.interval, 2.0, max(MAX_BACKOFF, self.interval))
            for update in result:
                yield update
            await self.sleep(self.interval)


class InMemoryRegistry:
    """The same interface over a dict, for pure unit tests of gateway, sidecar and balancers.

    Leases are honoured with the injected clock when ``expire()`` is called; it never fails,
    so ``staleness()`` is 0 unless a test sets ``stale_for``.
    """

    def __init__(self, clock: WallClock = utc_now) -> None:
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self._subscribers: list[asyncio.Queue[Update]] = []
        self.stale_for = 0.0

    def snapshot(self) -> dict[str, Instance]:
        return dict(self._instances)

    def staleness(self) -> float:
        return self.stale_for

    def _publish(self, updates: list[Update]) -> None:
        for queue in self._subscribers:
            for update in updates:
                queue.put_nowait(update)

    def put(self, instance: Instance) -> None:
        """Adds or changes an instance."""
        new = dict(self._instances)
        new[instance.instance_id] = instance
        self._publish(diff(self._instances, new))
        self._instances = new

    def remove(self, instance_id: str) -> None:
        new = {k: v for k, v in self._instances.items() if k != instance_id}
        self._publish(diff(self._instances, new))
        self._instances = new

    def expire(self) -> None:
        """Drops instances whose lease has ended by the injected clock."""
        now = self._clock()
        new = {k: v for k, v in self._instances.items() if v.expires_at is None or is_live(v, now)}
        self._publish(diff(self._instances, new))
        self._instances = new

    async def updates(self) -> AsyncGenerator[Update, None]:
        queue: asyncio.Queue[Update] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            current = self._instances
            yield Update(UpdateKind.RESET, tuple(current[i] for i in sorted(current)))
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)
