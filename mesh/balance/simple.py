"""ROUND_ROBIN, RANDOM and LEAST_REQUEST (power of two choices) over an endpoint list."""

from __future__ import annotations

import random
from collections.abc import Sequence

from mesh.balance.endpoints import Endpoint
from mesh.balance.load import LoadTracker


class RoundRobin:
    """Smooth weighted round robin (nginx's): weights interleave rather than burst."""

    __slots__ = ("_current", "endpoints")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._current = dict.fromkeys((e.address for e in self.endpoints), 0)

    def order(self, excluded: frozenset[str] = frozenset()) -> list[Endpoint]:
        members = [e for e in self.endpoints if e.address not in excluded]
        if not members:
            return []
        total = sum(e.weight for e in members)
        for e in members:
            self._current[e.address] += e.weight
        best = max(members, key=lambda e: self._current[e.address])
        self._current[best.address] -= total
        start = members.index(best)
        return members[start:] + members[:start]


def random_order(
    endpoints: Sequence[Endpoint], rng: random.Random, excluded: frozenset[str] = frozenset()
) -> list[Endpoint]:
    """A weighted random first pick, then the rest in random order (for retries)."""
    members = [e for e in endpoints if e.address not in excluded]
    if not members:
        return []
    first = rng.choices(members, weights=[e.weight for e in members])[0]
    rest = [e for e in members if e is not first]
    rng.shuffle(rest)
    return [first, *rest]


def least_request_order(
    endpoints: Sequence[Endpoint],
    rng: random.Random,
    tracker: LoadTracker,
    excluded: frozenset[str] = frozenset(),
) -> list[Endpoint]:
    """Power of two choices: of two random endpoints, the one with fewer in flight per weight.

    Nearly as good as the global least-loaded pick, without a herd all choosing the same
    momentarily idle endpoint (Mitzenmacher, 2001; Envoy's LEAST_REQUEST).
    """
    members = [e for e in endpoints if e.address not in excluded]
    if len(members) <= 1:
        return members
    a, b = rng.sample(members, 2)
    load_a = tracker.in_flight(a.address) / a.weight
    load_b = tracker.in_flight(b.address) / b.weight
    first = b if load_b < load_a else a
    rest = sorted(
        (e for e in members if e is not first),
        key=lambda e: (tracker.in_flight(e.address) / e.weight, e.address),
    )
    return [first, *rest]
