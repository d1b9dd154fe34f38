"""Consistent-hash rings over endpoints, with bounded loads and hot-key spreading.

A ring is built once (with uhashring) and never changes: uhashring is not thread-safe,
so a membership change builds a new :class:`HashRing` and the owner swaps its
reference. Lookups only read two tuples, so any number of readers may share a ring.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from uhashring import HashRing as _UHashRing

from mesh.balance.endpoints import Endpoint
from mesh.balance.load import LoadTracker

HASH_SPACE = 2**64
_SUCCESSOR_CACHE = 65536


def hash_key(key: str) -> int:
    """A 64-bit position on the ring (BLAKE2b: fast, well mixed, stable across processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


#: Envoy's ``maximum_ring_size`` default (Istio does not set it).
MAX_RING_SIZE = 8 * 1024 * 1024
#: Istio's ``host_selection_retry_max_attempts`` with its previous-hosts retry predicate.
HOST_SELECTION_ATTEMPTS = 5
_MASK = HASH_SPACE - 1


def envoy_points(weights: Sequence[int], minimum_ring_size: int) -> list[int]:
    """Points per endpoint as Envoy's ring hash builds them: ``minimumRingSize`` is the
    size of the whole ring, scaled up so the lightest endpoint gets a whole point, and
    each endpoint's share follows its weight (hashes accumulated as Envoy does)."""
    total = sum(weights)
    if not weights or total <= 0:
        return [0] * len(weights)
    lightest = min(weights) / total
    scale = min(math.ceil(lightest * minimum_ring_size) / lightest, float(MAX_RING_SIZE))
    counts = []
    current = target = 0.0
    for weight in weights:
        target += scale * weight / total
        count = 0
        while current < target:
            current += 1
            count += 1
        counts.append(count)
    return counts


def rehash_positions(key: str) -> Iterator[int]:
    """The positions Envoy's hash balancers try for ``key``'s retries, which Istio asks to
    avoid hosts already tried: the key's hash, then that hash mutated for each
    host-selection attempt (``hash ^ (~0 - attempt + 1)``, at most
    :data:`HOST_SELECTION_ATTEMPTS`). The ring and the Maglev table map them to owners."""
    position = hash_key(key)
    yield position
    for attempt in range(1, HOST_SELECTION_ATTEMPTS + 1):
        yield position ^ ((_MASK - attempt + 1) & _MASK)


class OrderedByKey:
    """What the ring and the Maglev table share: their size, and each key's endpoint order
    (its successors, or Envoy's rehashed picks) memoised, since hot keys repeat. The table
    never changes once built, so entries never go stale; a plain dict is safe to share (a
    racing writer stores the same value)."""

    __slots__ = ()
    endpoints: tuple[Endpoint, ...]
    _successors: dict[tuple[str, bool], tuple[Endpoint, ...]]

    def __len__(self) -> int:
        return len(self.endpoints)

    def __bool__(self) -> bool:
        return bool(self.endpoints)

    def order(self, key: str, *, successors: bool = True) -> tuple[Endpoint, ...]:
        """The endpoints to try for ``key``, owner first: its :meth:`successors` in table
        order, or with ``successors=False`` Envoy's :meth:`rehashed` retry choices."""
        found = self._successors.get((key, successors))
        if found is None:
            if len(self._successors) >= _SUCCESSOR_CACHE:
                self._successors.clear()
            found = tuple(self.successors(key) if successors else self.rehashed(key))
            self._successors[(key, successors)] = found
        return found

    def successors(self, key: str) -> Iterator[Endpoint]:
        raise NotImplementedError

    def rehashed(self, key: str) -> Iterator[Endpoint]:
        raise NotImplementedError


class KeyTable(Protocol):
    """What :func:`choose` and the admin API read of a hash table: the ring below, or
    Envoy's Maglev table (``mesh.balance.maglev``)."""

    @property
    def endpoints(self) -> tuple[Endpoint, ...]: ...
    @property
    def total_weight(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def vnodes(self) -> int: ...
    @property
    def per_endpoint(self) -> bool: ...
    @property
    def algorithm(self) -> str: ...
    def primary(self, key: str) -> Endpoint | None: ...
    def order(self, key: str, *, successors: bool = True) -> tuple[Endpoint, ...]: ...
    def shares(self) -> dict[str, float]: ...
    def points(self) -> dict[str, int]: ...


class HashRing(OrderedByKey):
    """An immutable ring, sized as Envoy's by default or per endpoint (meshserve's).

    Envoy's (``per_endpoint=False``, Istio's behaviour): ``vnodes`` (the DestinationRule's
    ``ringHash.minimumRingSize``) is the size of the whole ring, shared by weight. A
    joining endpoint takes its points' keys, and the others shrink to make room, so some
    keys also move between the endpoints already there.

    Per endpoint (the ``meshserve.io/ring-points: per-endpoint`` extension): each endpoint
    owns ``weight * vnodes`` points, which do not depend on how many endpoints there are,
    so adding one moves only the keys that land on its new points (≈ 1/(n+1) of them, all
    to it) and removing one moves only its own keys: warm weights stay where they are.
    """

    __slots__ = (
        "_by_address",
        "_owners",
        "_points",
        "_successors",
        "endpoints",
        "generation",
        "per_endpoint",
        "total_weight",
        "vnodes",
    )

    algorithm = "ring"

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        vnodes: int = 1024,
        generation: int = 0,
        per_endpoint: bool = False,
    ) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.endpoints = tuple(sorted(endpoints))
        self.vnodes = vnodes
        self.per_endpoint = per_endpoint
        self.generation = generation
        self._by_address = {e.address: e for e in self.endpoints}
        if len(self._by_address) != len(self.endpoints):
            raise ValueError("endpoint addresses on a ring must be distinct")
        if per_endpoint:
            nodes = {
                e.address: {"instance": e, "vnodes": vnodes, "weight": e.weight}
                for e in self.endpoints
            }
        else:
            counts = envoy_points([e.weight for e in self.endpoints], vnodes)
            nodes = {
                e.address: {"instance": e, "vnodes": count, "weight": 1}
                for e, count in zip(self.endpoints, counts, strict=True)
            }
        built = _UHashRing(nodes, hash_fn=hash_key) if nodes else None
        points = built.get_points() if built is not None else []
        self._points: tuple[int, ...] = tuple(p for p, _ in points)
        self._owners: tuple[str, ...] = tuple(name for _, name in points)
        self.total_weight = sum(e.weight for e in self.endpoints)
        self._successors = {}

    def _position(self, key: str) -> int:
        index = bisect(self._points, hash_key(key))
        return 0 if index == len(self._points) else index

    def primary(self, key: str) -> Endpoint | None:
        """The endpoint that owns ``key``."""
        if not self._points:
            return None
        return self._by_address[self._owners[self._position(key)]]

    def _owner_at(self, position: int) -> str:
        index = bisect(self._points, position)
        return self._owners[0 if index == len(self._points) else index]

    def rehashed(self, key: str) -> Iterator[Endpoint]:
        """Distinct endpoints as Envoy's ring picks them for retries: the owners of
        :func:`rehash_positions`; a retry past them reuses one."""
        if not self._points:
            return
        seen: set[str] = set()
        for position in rehash_positions(key):
            owner = self._owner_at(position)
            if owner not in seen:
                seen.add(owner)
                yield self._by_address[owner]

    def successors(self, key: str) -> Iterator[Endpoint]:
        """Distinct endpoints clockwise from ``key``: the owner first, then retry order."""
        if not self._points:
            return
        seen: set[str] = set()
        start = self._position(key)
        count = len(self._points)
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if owner not in seen:
                seen.add(owner)
                yield self._by_address[owner]
                if len(seen) == len(self._by_address):
                    return

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each endpoint owns (a point owns the arc before it)."""
        shares = dict.fromkeys(self._by_address, 0.0)
        previous = self._points[-1] - HASH_SPACE if self._points else 0
        for point, owner in zip(self._points, self._owners, strict=True):
            shares[owner] += (point - previous) / HASH_SPACE
            previous = point
        return shares

    def points(self) -> dict[str, int]:
        counts = dict.fromkeys(self._by_address, 0)
        for owner in self._owners:
            counts[owner] += 1
        return counts


@dataclass(frozen=True)
class RingPolicy:
    """How a key's endpoint is chosen among its ring successors."""

    #: Bounded-load factor c: an endpoint takes a key only while its in-flight count is
    #: below ⌈c · (in-flight + 1) · weight / total weight⌉; None: plain consistent hashing.
    bounded_load: float | None = 1.25
    #: A hot key is spread over this many successors (least loaded first); 1: never.
    hot_key_replicas: int = 1
    #: In-flight requests for one key from which it counts as hot.
    hot_key_threshold: int = 4
    #: A full owner keeps a request whose key no successor holds warm until it has this
    #: many times its capacity in flight; 1.0 is classic bounded loads.
    cold_spill: float = 2.0
    #: Try ring successors clockwise after the owner (meshserve's, so a failed-over or
    #: spilled call lands where its weights are likely warm); False: Envoy's rehashed
    #: choices (Istio's behaviour).
    successors: bool = False


@dataclass(frozen=True)
class RingChoice:
    """Candidates in the order to try them, and why the first was chosen."""

    candidates: tuple[Endpoint, ...]
    reasons: tuple[str, ...]


def capacity(factor: float, total_in_flight: int, weight: int, total_weight: int) -> int:
    """The bounded-load cap of one endpoint, counting the request being placed."""
    return max(1, math.ceil(factor * (total_in_flight + 1) * weight / total_weight))


def choose(
    ring: KeyTable,
    key: str,
    tracker: LoadTracker,
    policy: RingPolicy,
    excluded: Collection[str] = (),
    *,
    explain: bool = True,
) -> RingChoice:
    """Orders ``key``'s successors for a request, skipping ``excluded`` (ejected, tried).

    1. Successors clockwise from the key: stickiness keeps a version on the GPU that
       already holds it.
    2. A hot key (``hot_key_threshold`` in flight) may use its first ``hot_key_replicas``
       successors, least loaded first, so one version cannot swamp one worker.
    3. Bounded loads (Mirrokni et al., 2018): past an owner at capacity ⌈c·average⌉, to a
       successor that recently served the key (its weights are likely loaded) with room,
       else to the next successor with room once the owner holds ``cold_spill`` times its
       capacity (with ``cold_spill`` 1, classic bounded loads).
    """
    order = list(ring.order(key, successors=policy.successors))
    if excluded:
        order = [e for e in order if e.address not in excluded]
    reasons: list[str] = []
    if not order:
        return RingChoice((), ("no endpoint left on the ring after exclusions",))
    if explain:
        reasons.append(f"ring owner of key {key!r}: {order[0].address}")
    replicas = min(policy.hot_key_replicas, len(order))
    if replicas > 1:
        in_flight = tracker.key_in_flight(key)
        if in_flight >= policy.hot_key_threshold:
            head = sorted(
                range(replicas),
                key=lambda i: (tracker.in_flight(order[i].address) / order[i].weight, i),
            )
            order = [order[i] for i in head] + order[replicas:]
            if explain:
                reasons.append(
                    f"hot key ({in_flight} in flight >= {policy.hot_key_threshold}): least "
                    f"loaded of {replicas} successors is {order[0].address}"
                )
    if policy.bounded_load is not None:
        if excluded:
            members = [e for e in ring.endpoints if e.address not in excluded]
            total_weight = sum(e.weight for e in members)
        else:
            members, total_weight = list(ring.endpoints), ring.total_weight
        total = tracker.total([e.address for e in members])
        factor = policy.bounded_load

        def free(e: Endpoint) -> bool:
            return tracker.in_flight(e.address) < capacity(factor, total, e.weight, total_weight)

        owner = order[0]
        if not free(owner):
            # Spill, but mind where the key's weights are: a successor that recently took
            # this key probably holds them, so a warm one with room goes first. A cold
            # one would pay a model load (and evict another version), which costs more
            # than queueing a little longer at the owner, so the owner keeps the request
            # up to cold_spill times its capacity.
            warm = tracker.warm(key)
            under = [i for i, e in enumerate(order) if i and free(e)]
            hard = math.ceil(
                policy.cold_spill * capacity(factor, total, owner.weight, total_weight)
            )
            chosen = next((i for i in under if order[i].address in warm), None)
            if chosen is None:
                chosen = 0 if tracker.in_flight(owner.address) < hard else (under or [0])[0]
            if explain:
                if chosen:
                    how = "warm for this key" if order[chosen].address in warm else "cold"
                    reasons.append(
                        f"bounded load c={factor:g}: {owner.address} is at capacity; "
                        f"spilled to {order[chosen].address} ({how})"
                    )
                else:
                    reasons.append(
                        f"bounded load c={factor:g}: {owner.address} is at capacity but no "
                        f"successor is warm for this key; it stays below {hard} in flight"
                    )
            if chosen:
                order = [order[chosen], *order[:chosen], *order[chosen + 1 :]]
    return RingChoice(tuple(order), tuple(reasons))
