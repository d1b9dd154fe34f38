"""Weighted choice of a route destination with an injected random source."""

from __future__ import annotations

import random
from collections.abc import Sequence

from mesh.config.virtual_service import RouteDestination


def pick_destination(route: Sequence[RouteDestination], rng: random.Random) -> RouteDestination:
    """One destination, each with probability weight/100 (validated to sum to 100).

    A lone destination takes all traffic whatever its weight says, as in Istio.
    """
    if not route:
        raise ValueError("a route needs at least one destination")
    if len(route) == 1:
        return route[0]
    total = sum(d.weight for d in route)
    point = rng.random() * total
    for destination in route:
        if point < destination.weight:
            return destination
        point -= destination.weight
    # Only float rounding at the very top end gets here: the last weighted destination.
    return next(d for d in reversed(route) if d.weight > 0)


def percent_hit(percentage: float, rng: random.Random) -> bool:
    """True for ``percentage`` percent of calls (fault injection, mirroring)."""
    if percentage >= 100.0:
        return True
    if percentage <= 0.0:
        return False
    return rng.random() * 100.0 < percentage
