"""Locality load balancing (DestinationRule ``localityLbSetting``), as Istio programs Envoy.

Endpoints carry their locality in the labels their sidecars register (Kubernetes'
``topology.kubernetes.io/region`` and ``/zone``, Istio's ``topology.istio.io/subzone``);
the proxy knows its own (the gateway's ``--locality``, a sidecar's own labels).

- **Failover** (Istio's default when outlier detection is on): endpoints are ranked into
  priorities — same region/zone/subzone 0, same region/zone 1, same region 2, the rest 3,
  and with ``failover`` entries from the proxy's region, regions other than its ``to`` 4 —
  renumbered without gaps. Traffic goes to the first priority as far as its health allows,
  with Envoy's overprovisioning factor 1.4: a priority with 70 % of its endpoints healthy
  (not ejected) still takes everything, below that the rest spills to the next.
- **Distribute**: the first entry whose ``from`` matches the proxy's locality gives each
  ``to`` locality a weight; localities it does not name get no traffic. A locality is
  picked by weight (scaled by its health the same way), then an endpoint within it.

Pure: the cluster hands in endpoints, what is ejected and a random draw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from mesh.balance.endpoints import Endpoint
from mesh.balance.ring import hash_key

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
#: Envoy's default overprovisioning factor (1.4, as 140 %).
OVERPROVISIONING = 1.4


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""

    @classmethod
    def parse(cls, text: str) -> Locality:
        """``region[/zone[/subzone]]``."""
        parts = [p.strip() for p in text.split("/")]
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"a locality is region[/zone[/subzone]], got {text!r}")
        parts += [""] * (3 - len(parts))
        return cls(*parts)

    @classmethod
    def of(cls, labels: Mapping[str, str] | Sequence[tuple[str, str]]) -> Locality:
        found = dict(labels)
        return cls(
            found.get(REGION_LABEL, ""), found.get(ZONE_LABEL, ""), found.get(SUBZONE_LABEL, "")
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.region, self.zone, self.subzone) if p) or "unknown"


def own_locality(labels: Sequence[tuple[str, str]]) -> Locality | None:
    """A proxy's locality from its instance labels; None when they name no region."""
    found = Locality.of(labels)
    return found if found.region else None


def locality_matches(pattern: str, locality: Locality) -> bool:
    """Istio's locality match: ``region/zone/subzone`` parts, ``*`` for any (a trailing
    ``*`` covers the parts after it; missing parts match anything)."""
    parts = pattern.split("/")
    for want, have in zip(parts, (locality.region, locality.zone, locality.subzone), strict=False):
        if want == "*":
            return True
        if want != have:
            return False
    return True


def priority(proxy: Locality, endpoint: Locality) -> int:
    if proxy.region != endpoint.region:
        return 3
    if proxy.zone != endpoint.zone:
        return 2
    return 0 if proxy.subzone == endpoint.subzone else 1


def failover_levels(
    proxy: Locality, endpoints: Sequence[Endpoint], failover: Sequence[tuple[str, str]]
) -> tuple[tuple[Endpoint, ...], ...]:
    """Endpoints by priority, best first, with empty priorities dropped (Istio renumbers)."""
    ranked: dict[int, list[Endpoint]] = {}
    for endpoint in endpoints:
        where = Locality.of(endpoint.labels)
        level = priority(proxy, where)
        if level == 3:
            for source, target in failover:
                if source == proxy.region:
                    if where.region != target:
                        level = 4
                    break
        ranked.setdefault(level, []).append(endpoint)
    return tuple(tuple(ranked[k]) for k in sorted(ranked))


def health(group: Sequence[Endpoint], excluded: Collection[str]) -> float:
    """Envoy's health of a priority or locality in [0, 1]: healthy share times 1.4, capped."""
    if not group:
        return 0.0
    healthy = sum(1 for e in group if e.address not in excluded)
    return min(1.0, OVERPROVISIONING * healthy / len(group))


def priority_loads(levels: Sequence[Sequence[Endpoint]], excluded: Collection[str]) -> list[float]:
    """Each priority's share of traffic (Envoy's priority load): the first takes what its
    health allows, the next the rest as far as its own does, normalised when the total
    health is below 100 %; with nothing healthy anywhere, all to the first (panic)."""
    healths = [health(level, excluded) for level in levels]
    total = min(1.0, sum(healths))
    if total == 0:
        return [1.0] + [0.0] * (len(levels) - 1)
    loads, left = [], 1.0
    for h in healths:
        share = min(left, h / total)
        loads.append(share)
        left -= share
    return loads


def pick_index(shares: Sequence[float], draw: float) -> int:
    """The index whose cumulative share covers ``draw`` in [0, 1)."""
    total = 0.0
    for i, share in enumerate(shares):
        total += share
        if draw < total:
            return i
    return max(i for i, s in enumerate(shares) if s > 0) if any(shares) else 0


def distribution(
    proxy: Locality,
    endpoints: Sequence[Endpoint],
    distribute: Sequence[tuple[str, Sequence[tuple[str, int]]]],
) -> tuple[tuple[tuple[Endpoint, ...], int], ...] | None:
    """(endpoints of one locality, its weight) per locality the first matching ``from``
    distributes to; None when no entry is from the proxy's locality (no effect)."""
    for source, targets in distribute:
        if not locality_matches(source, proxy):
            continue
        groups: dict[Locality, list[Endpoint]] = {}
        for endpoint in endpoints:
            groups.setdefault(Locality.of(endpoint.labels), []).append(endpoint)
        taken: set[Locality] = set()
        weighted: list[tuple[tuple[Endpoint, ...], int]] = []
        for pattern, weight in targets:
            matched = [
                loc
                for loc in sorted(groups, key=str)
                if loc not in taken and locality_matches(pattern, loc)
            ]
            taken.update(matched)
            # A wildcard that covers several localities splits its weight between them
            # (by their size, as Istio divides it by their original weights), rounded up.
            size = sum(len(groups[loc]) for loc in matched)
            for loc in matched:
                share = math.ceil(weight * len(groups[loc]) / size) if size else 0
                if share > 0:
                    weighted.append((tuple(groups[loc]), share))
        return tuple(weighted)
    return None


def choose_group(
    groups: Sequence[tuple[Sequence[Endpoint], float]], excluded: Collection[str], draw: float
) -> int | None:
    """Envoy's locality-weighted pick: weight times health; None when no group has any."""
    effective = [weight * health(group, excluded) for group, weight in groups]
    total = sum(effective)
    if total <= 0:
        return None
    return pick_index([e / total for e in effective], draw)


def draw_for(key: str | None, rng: random.Random) -> float:
    """A draw in [0, 1): from the hash key when there is one (a key keeps its priority
    and locality, as Envoy picks them by the hash), else random."""
    if key is None:
        return rng.random()
    return (hash_key(key) % 10_000) / 10_000
