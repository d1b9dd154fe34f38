"""Maglev table against the ring hash, side by side: balance, key movement, lookup and build cost.

For n endpoints: the spread of key shares (max/min of the ideal 1/n, over a sample of
keys), the fraction of keys that move when one endpoint joins or leaves (ideal: 1/(n+1)
and 1/n), the fraction of keys that move between endpoints that stayed (ideal: 0), the
build time and the lookup time. Envoy's ring (``minimumRingSize`` 1024, the default) and
meshserve's per-endpoint ring against Envoy's Maglev (table 65537, the default).

Run: ``.venv/bin/python -m bench.maglev [--keys 20000]``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

from mesh.balance.endpoints import Endpoint
from mesh.balance.maglev import MaglevTable
from mesh.balance.ring import HashRing, KeyTable

Builder = Callable[[list[Endpoint]], KeyTable]

BUILDERS: dict[str, Builder] = {
    "ring (Envoy, 1024)": lambda eps: HashRing(eps, vnodes=1024),
    "ring (per-endpoint, 1024)": lambda eps: HashRing(eps, vnodes=1024, per_endpoint=True),
    "maglev (65537)": lambda eps: MaglevTable(eps),
}


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.{i // 250}.{i % 250}:8001") for i in range(n)]


def owners(table: KeyTable, keys: list[str]) -> list[str]:
    found = []
    for key in keys:
        owner = table.primary(key)
        assert owner is not None
        found.append(owner.address)
    return found


def movement(before: list[str], after: list[str], changed: str) -> tuple[float, float]:
    """(keys that moved, keys that moved between endpoints other than ``changed``)."""
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    collateral = sum(a != b and changed not in (a, b) for a, b in zip(before, after, strict=True))
    return moved / len(before), collateral / len(before)


def row(name: str, build: Builder, n: int, keys: list[str]) -> str:
    eps = endpoints(n + 1)
    base, joined = eps[:n], eps
    start = time.perf_counter()
    table = build(base)
    build_ms = (time.perf_counter() - start) * 1000
    before = owners(table, keys)
    start = time.perf_counter()
    for key in keys:
        table.primary(key)
    lookup_us = (time.perf_counter() - start) / len(keys) * 1e6
    counts = Counter(before)
    ideal = len(keys) / n
    spread = f"{min(counts.get(e.address, 0) for e in base) / ideal:.3f}-{max(counts.values()) / ideal:.3f}"
    join_moved, join_collateral = movement(before, owners(build(joined), keys), eps[n].address)
    leave_moved, leave_collateral = movement(before, owners(build(base[1:]), keys), base[0].address)
    return (
        f"| {name} | {n} | {spread} | {join_moved:.3f} ({1 / (n + 1):.3f}) | "
        f"{join_collateral:.4f} | {leave_moved:.3f} ({1 / n:.3f}) | {leave_collateral:.4f} | "
        f"{build_ms:.0f} | {lookup_us:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=20000)
    parser.add_argument("--sizes", default="3,8,32")
    args = parser.parse_args()
    keys = [f"model-{i}/v{i % 7}" for i in range(args.keys)]
    print(
        "| table | endpoints | share min-max (x ideal) | moved on join (ideal) | "
        "collateral on join | moved on leave (ideal) | collateral on leave | build ms | "
        "lookup µs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        for name, build in BUILDERS.items():
            print(row(name, build, n, keys))


if __name__ == "__main__":
    main()
