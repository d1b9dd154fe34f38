"""Endpoints as balancers see them, and per host/subset snapshots built from registry instances."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

#: Registry statuses that take traffic. DRAINING finishes in-flight work but gets none new.
SERVING_STATUSES = frozenset({"SERVING", "SERVING_STATUS_SERVING"})


class LoadView(Protocol):
    """What an instance reports about its load (the registry's ``Load`` satisfies it)."""

    @property
    def in_flight(self) -> int: ...


class InstanceView(Protocol):
    """The part of a registry instance the balancers need.

    The registry's ``Instance`` type satisfies it; so does any test double. ``status``
    is the name of the ServingStatus ("SERVING", "NOT_SERVING", "DRAINING"; the protobuf
    enum names with the ``SERVING_STATUS_`` prefix are accepted too).
    """

    @property
    def service(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def status(self) -> str: ...
    @property
    def load(self) -> LoadView | None: ...


#: The label an instance may carry to weigh more on rings and in weighted picks.
WEIGHT_LABEL = "meshserve.io/weight"


@dataclass(frozen=True, order=True)
class Endpoint:
    """One upstream: immutable; in-flight counts live in :class:`~mesh.balance.load.LoadTracker`."""

    address: str
    instance_id: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    weight: int = 1
    healthy: bool = True

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("endpoint address must not be empty")
        if not 1 <= self.weight <= 128:
            raise ValueError(f"endpoint weight must be in [1, 128], got {self.weight}")

    @property
    def key(self) -> str:
        """Identity on rings and in trackers: the address (one process per address)."""
        return self.address

    def matches(self, selector: Iterable[tuple[str, str]]) -> bool:
        labels = dict(self.labels)
        return all(labels.get(k) == v for k, v in selector)


def endpoint_from_instance(instance: InstanceView) -> Endpoint:
    labels = dict(instance.labels)
    weight = 1
    text = labels.get(WEIGHT_LABEL)
    if text is not None and text.isdigit():
        weight = min(max(int(text), 1), 128)
    return Endpoint(
        address=instance.address,
        instance_id=instance.id,
        labels=tuple(sorted(labels.items())),
        weight=weight,
        healthy=instance.status.upper() in SERVING_STATUSES,
    )


@dataclass(frozen=True)
class EndpointSet:
    """The endpoints of one host (and subset) at one moment; replaced whole on any change."""

    host: str
    subset: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    #: Increments with each membership change of this host/subset.
    generation: int = 0

    @property
    def healthy(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.healthy)

    def by_address(self, address: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.address == address), None)

    def describe(self) -> str:
        return self.host + (f"/{self.subset}" if self.subset else "")


def select(
    endpoints: Iterable[Endpoint],
    host: str,
    subset: str = "",
    labels: Iterable[tuple[str, str]] = (),
    generation: int = 0,
) -> EndpointSet:
    """The endpoints matching a subset's labels, sorted by address for stable rings."""
    selector = tuple(labels)
    members = tuple(sorted(e for e in endpoints if e.matches(selector)))
    return EndpointSet(host=host, subset=subset, endpoints=members, generation=generation)


class EndpointsSnapshot:
    """All endpoints of all hosts, as the discovery source last reported them.

    Immutable after construction: a new snapshot replaces the old one on each update.
    """

    __slots__ = ("_by_host", "generation")

    def __init__(self, by_host: Mapping[str, Iterable[Endpoint]], generation: int = 0) -> None:
        self._by_host = {h: tuple(sorted(eps)) for h, eps in by_host.items()}
        self.generation = generation

    @classmethod
    def from_instances(
        cls, instances: Iterable[InstanceView], generation: int = 0
    ) -> EndpointsSnapshot:
        by_host: dict[str, list[Endpoint]] = {}
        for instance in instances:
            by_host.setdefault(instance.service, []).append(endpoint_from_instance(instance))
        return cls(by_host, generation)

    def hosts(self) -> list[str]:
        return sorted(self._by_host)

    def endpoints(self, host: str) -> tuple[Endpoint, ...]:
        return self._by_host.get(host, ())
