"""Envoy's Maglev table (DestinationRule ``consistentHash.maglev``), an alternative to the ring.

Maglev (Eisenbud et al., NSDI 2016) fills a lookup table of prime size M: each endpoint
walks its own permutation of the slots (``offset + next * skip`` mod M) and takes the first
free one, in turns weighted as Envoy weighs them, until the table is full. A key is one
table lookup (O(1), against the ring's binary search), every endpoint owns almost exactly
its weight's share of slots, and a membership change moves slightly more keys than a ring
would (minimal disruption, not a guarantee). ``bench/maglev.py`` measures both.

The table has the ring's interface (:class:`mesh.balance.ring.HashRing`), so
:func:`mesh.balance.ring.choose` (bounded loads, hot keys, retries) works on either.
Immutable once built, like the ring.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

from mesh.balance.endpoints import Endpoint
from mesh.balance.ring import OrderedByKey, hash_key, rehash_positions

#: Envoy's (and Istio's) default table size: a prime.
DEFAULT_TABLE_SIZE = 65537
#: Envoy's largest accepted table size (Istio's documented limit).
MAX_TABLE_SIZE = 5000011


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    factor = 3
    while factor * factor <= n:
        if n % factor == 0:
            return False
        factor += 2
    return True


def _seeded(address: str, seed: int) -> int:
    # Envoy hashes the address with xxHash64 seeds 0 and 1; BLAKE2b with a salt plays the
    # same part here (as the ring's points use BLAKE2b instead of Envoy's xxHash).
    digest = hashlib.blake2b(address.encode(), digest_size=8, salt=seed.to_bytes(16, "big"))
    return int.from_bytes(digest.digest(), "big")


def build_table(endpoints: Sequence[Endpoint], size: int) -> list[int]:
    """Slot → index into ``endpoints``, filled as Envoy's ``MaglevTable`` does: in each
    round an endpoint takes a slot once its weight's turn has come (the heaviest every
    round, one of a third the weight every third), each at the next free slot of its
    permutation."""
    table = [-1] * size
    if not endpoints:
        return table
    offsets = [_seeded(e.address, 0) % size for e in endpoints]
    skips = [_seeded(e.address, 1) % (size - 1) + 1 for e in endpoints]
    weights = [e.weight for e in endpoints]
    heaviest = max(weights)
    targets = [0] * len(endpoints)
    cursor = list(offsets)  # offset + next * skip, kept reduced mod size
    filled = 0
    iteration = 0
    while filled < size:
        iteration += 1
        for i, weight in enumerate(weights):
            if iteration * weight < targets[i]:
                continue
            targets[i] += heaviest
            slot, skip = cursor[i], skips[i]
            while table[slot] != -1:
                slot += skip
                if slot >= size:
                    slot -= size
            table[slot] = i
            slot += skip
            cursor[i] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                break
    return table


class MaglevTable(OrderedByKey):
    """An immutable Maglev lookup table with :class:`~mesh.balance.ring.HashRing`'s interface."""

    __slots__ = (
        "_by_address",
        "_successors",
        "_table",
        "endpoints",
        "generation",
        "total_weight",
        "vnodes",
    )

    #: What :class:`~mesh.balance.cluster.Cluster` compares before reusing a table.
    per_endpoint = False
    algorithm = "maglev"

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        table_size: int = DEFAULT_TABLE_SIZE,
        generation: int = 0,
    ) -> None:
        if not is_prime(table_size):
            raise ValueError(f"a Maglev table size must be prime, got {table_size}")
        self.endpoints = tuple(sorted(endpoints))
        self._by_address = {e.address: e for e in self.endpoints}
        if len(self._by_address) != len(self.endpoints):
            raise ValueError("endpoint addresses in a Maglev table must be distinct")
        self.vnodes = table_size
        self.generation = generation
        self.total_weight = sum(e.weight for e in self.endpoints)
        self._table = build_table(self.endpoints, table_size)
        self._successors = {}

    def _at(self, position: int) -> Endpoint:
        return self.endpoints[self._table[position % self.vnodes]]

    def primary(self, key: str) -> Endpoint | None:
        return self._at(hash_key(key)) if self.endpoints else None

    def rehashed(self, key: str) -> Iterator[Endpoint]:
        """Envoy's Maglev retry choices: the owners of :func:`rehash_positions`, as its
        ring does."""
        if not self.endpoints:
            return
        seen: set[str] = set()
        for position in rehash_positions(key):
            owner = self._at(position)
            if owner.address not in seen:
                seen.add(owner.address)
                yield owner

    def successors(self, key: str) -> Iterator[Endpoint]:
        """Distinct endpoints in table order from the key's slot (the ``ring-successor``
        retry order of ``meshserve.io/retry-order``)."""
        if not self.endpoints:
            return
        seen: set[int] = set()
        start = hash_key(key) % self.vnodes
        for step in range(self.vnodes):
            index = self._table[(start + step) % self.vnodes]
            if index not in seen:
                seen.add(index)
                yield self.endpoints[index]
                if len(seen) == len(self.endpoints):
                    return

    def points(self) -> dict[str, int]:
        counts = dict.fromkeys(self._by_address, 0)
        for index in self._table:
            if index >= 0:
                counts[self.endpoints[index].address] += 1
        return counts

    def shares(self) -> dict[str, float]:
        return {a: n / self.vnodes for a, n in self.points().items()}
