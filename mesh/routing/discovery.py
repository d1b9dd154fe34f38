"""Where endpoints come from: a stream of registry updates, the table they maintain, and the
loop that follows them (shared by the gateway and the sidecar's outbound)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mesh.balance.endpoints import EndpointsSnapshot, InstanceView

log = logging.getLogger(__name__)

UpdateKind = Literal["reset", "add", "remove", "change"]


@dataclass(frozen=True)
class DiscoveryUpdate:
    """One change from the registry.

    ``reset`` carries every instance (the first update of a watch, and after a
    reconnect); ``add``/``change`` carry the instances that appeared or changed;
    ``remove`` carries the instances that left (only their ids are used).
    """

    kind: UpdateKind
    instances: tuple[InstanceView, ...] = ()


class DiscoverySource(Protocol):
    """What routing needs from the registry: an endless stream of updates.

    The Elasticsearch watch implements it in production; :class:`StaticDiscovery`
    serves tests and fixed deployments. When the store is unreachable the stream just
    stays quiet, and the gateway keeps routing on its last snapshot.
    """

    def updates(self) -> AsyncIterator[DiscoveryUpdate]: ...


class EndpointTable:
    """Instances by id, folded from updates into immutable :class:`EndpointsSnapshot`s."""

    def __init__(self) -> None:
        self._instances: dict[str, InstanceView] = {}
        self.generation = 0

    def apply(self, update: DiscoveryUpdate) -> EndpointsSnapshot:
        if update.kind == "reset":
            self._instances = {i.id: i for i in update.instances}
        elif update.kind in ("add", "change"):
            self._instances.update((i.id, i) for i in update.instances)
        elif update.kind == "remove":
            for instance in update.instances:
                self._instances.pop(instance.id, None)
        else:  # pragma: no cover - guarded by the Literal type
            raise ValueError(f"unknown update kind {update.kind!r}")
        self.generation += 1
        return self.snapshot()

    def snapshot(self) -> EndpointsSnapshot:
        return EndpointsSnapshot.from_instances(self._instances.values(), self.generation)

    def instances(self) -> list[InstanceView]:
        return sorted(self._instances.values(), key=lambda i: (i.service, i.id))


@dataclass(frozen=True)
class StaticLoad:
    in_flight: int = 0


@dataclass(frozen=True)
class StaticInstance:
    """A plain instance for static discovery and tests (satisfies ``InstanceView``)."""

    service: str
    id: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    status: str = "SERVING"
    load: StaticLoad | None = None


class StaticDiscovery:
    """An in-memory source: a fixed set of instances, changed by calling its methods."""

    def __init__(self, instances: Iterable[InstanceView] = ()) -> None:
        self._initial = tuple(instances)
        self._queue: asyncio.Queue[DiscoveryUpdate] = asyncio.Queue()

    async def updates(self) -> AsyncIterator[DiscoveryUpdate]:
        yield DiscoveryUpdate("reset", self._initial)
        while True:
            yield await self._queue.get()

    def push(self, kind: UpdateKind, *instances: InstanceView) -> None:
        self._queue.put_nowait(DiscoveryUpdate(kind, tuple(instances)))


def parse_static(spec: str) -> StaticInstance:
    """``service=host:port[,label=value...]`` from the command line."""
    head, _, rest = spec.partition(",")
    service, sep, address = head.partition("=")
    if not sep or not service or ":" not in address:
        raise ValueError(f"expected service=host:port[,label=value...], got {spec!r}")
    labels: dict[str, str] = {}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"label {pair!r} in {spec!r} must be key=value")
        labels[key] = value
    return StaticInstance(service, f"{service}@{address}", address, labels)


async def follow(
    source: DiscoverySource,
    table: EndpointTable,
    on_snapshot: Callable[[EndpointsSnapshot], None],
    *,
    retry: float = 1.0,
) -> None:
    """Folds discovery updates into endpoint snapshots, forever, handing each one on.

    A source that fails is restarted after ``retry`` seconds; meanwhile routing stays on
    the last snapshot (last known good), since nothing is handed on until it recovers.
    """
    while True:
        try:
            async for update in source.updates():
                on_snapshot(table.apply(update))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("discovery source failed; routing on the last snapshot, retrying")
        await asyncio.sleep(retry)


#: How long a starting proxy waits for its first discovery snapshot before it listens anyway
#: (Envoy's ``initial_fetch_timeout`` default).
INITIAL_FETCH_TIMEOUT_S = 15.0


async def warm(discovered: asyncio.Event, timeout: float, who: str) -> None:
    """Waits for a proxy's first discovery snapshot (``discovered``) before it listens, as
    Envoy warms a listener until its clusters' first fetch: a proxy restarted under load
    would otherwise answer "no healthy endpoint" for a store round trip. A store that does
    not answer within ``timeout`` does not keep the proxy shut: it listens and routes what
    discovery brings later (Envoy's ``initial_fetch_timeout``)."""
    try:
        await asyncio.wait_for(discovered.wait(), timeout)
    except TimeoutError:
        log.warning(
            "%s: no discovery snapshot within %.0f s; listening anyway (calls find no "
            "endpoint until the store answers)",
            who,
            timeout,
        )
