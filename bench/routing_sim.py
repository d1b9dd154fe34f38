"""Discrete-event simulation of the multi-version workload over the real routing core.

The same policies as ``bench.gateway``'s multi-version table, but with simulated time:
no sockets, no CPU contention, so the figures compare routing policies alone and
repeat exactly. Run: ``.venv/bin/python -m bench.routing_sim``.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.balance.endpoints import Endpoint
from mesh.balance.load import LoadTracker
from mesh.balance.ring import HashRing, RingPolicy, choose
from mesh.balance.simple import RoundRobin


@dataclass
class Worker:
    """One GPU: a FIFO queue, one request at a time, an LRU of loaded versions."""

    capacity: int
    load_s: float
    infer_s: float
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)
    queue: deque[tuple[int, str, float]] = field(default_factory=deque)
    busy: bool = False
    loads: int = 0

    def service_time(self, key: str) -> float:
        cost = self.infer_s
        if key in self.loaded:
            self.loaded.move_to_end(key)
        else:
            self.loads += 1
            cost += self.load_s
            self.loaded[key] = None
            if len(self.loaded) > self.capacity:
                self.loaded.popitem(last=False)
        return cost


Router = Callable[[str, LoadTracker], Endpoint]


def ring_router(endpoints: list[Endpoint], policy: RingPolicy) -> Router:
    # meshserve's strategies run on its per-endpoint ring (config/inference.yaml's
    # meshserve.io/ring-points); Istio's plain hashing on Envoy's whole ring.
    ring = HashRing(endpoints, vnodes=1024, per_endpoint=policy.successors)
    return lambda key, tracker: choose(ring, key, tracker, policy, explain=False).candidates[0]


def round_robin_router(endpoints: list[Endpoint]) -> Router:
    rr = RoundRobin(endpoints)
    return lambda key, tracker: rr.order()[0]


def simulate(
    router: Router,
    endpoints: list[Endpoint],
    *,
    versions: int,
    zipf_s: float,
    clients: int,
    requests: int,
    capacity: int,
    load_ms: float,
    infer_ms: float,
    seed: int,
) -> tuple[float, float, float, float]:
    """Returns (requests/s, p50 ms, p99 ms, load-miss ratio)."""
    rng = random.Random(seed)
    weights = [1 / rank**zipf_s for rank in range(1, versions + 1)]
    workers = {e.address: Worker(capacity, load_ms / 1000, infer_ms / 1000) for e in endpoints}
    tracker = LoadTracker()
    events: list[
        tuple[float, int, int, str, str, float]
    ] = []  # (time, seq, client, address, key, start)
    seq = 0
    latencies: list[float] = []
    now = 0.0

    def start_service(address: str) -> None:
        nonlocal seq
        worker = workers[address]
        if worker.busy or not worker.queue:
            return
        client, key, began = worker.queue.popleft()
        worker.busy = True
        seq += 1
        heapq.heappush(events, (now + worker.service_time(key), seq, client, address, key, began))

    def submit(client: int) -> None:
        key = f"llm/{rng.choices(range(versions), weights=weights)[0] + 1}"
        endpoint = router(key, tracker)
        tracker.start(endpoint.address, key)
        workers[endpoint.address].queue.append((client, key, now))
        start_service(endpoint.address)

    for client in range(clients):
        submit(client)
    while len(latencies) < requests:
        now, _, client, address, key, began = heapq.heappop(events)
        tracker.finish(address, key)
        latencies.append((now - began) * 1000)
        workers[address].busy = False
        start_service(address)
        submit(client)
    total_loads = sum(w.loads for w in workers.values())
    quantiles = statistics.quantiles(latencies, n=100)
    return len(latencies) / now, quantiles[49], quantiles[98], total_loads / len(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=8, help="versions a worker holds")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--load-ms", type=float, default=40.0)
    parser.add_argument("--infer-ms", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    endpoints = [Endpoint(f"w{i}") for i in range(args.workers)]

    def ring(policy: RingPolicy) -> Callable[[], Router]:
        return lambda: ring_router(endpoints, policy)

    routers: dict[str, Callable[[], Router]] = {
        "meshserve: bounded load 1.25, cold spill 2, hot keys over 2": ring(
            RingPolicy(1.25, 2, 4, 2.0, successors=True)
        ),
        "bounded load 1.25, cold spill 2": ring(RingPolicy(1.25, 1, 4, 2.0, successors=True)),
        "classic bounded load 1.25 (cold spill 1)": ring(
            RingPolicy(1.25, 1, 4, 1.0, successors=True)
        ),
        "hot keys over 2 only": ring(RingPolicy(None, 2, 4, successors=True)),
        "plain consistent hash (Istio's)": ring(RingPolicy(None, 1, 4)),
        "round robin": lambda: round_robin_router(endpoints),
    }
    print(
        f"\n## Simulated: {args.versions} versions, Zipf s={args.zipf}, {args.workers} workers "
        f"holding <= {args.capacity} versions (load {args.load_ms:g} ms, infer {args.infer_ms:g} ms), "
        f"{args.clients} closed-loop clients, {args.requests} requests x {args.seeds} seeds\n"
    )
    print("| routing | req/s | p50 ms | p99 ms | loads per request |")
    print("|---|---:|---:|---:|---:|")
    for name, make in routers.items():
        runs = [
            simulate(
                make(),
                endpoints,
                versions=args.versions,
                zipf_s=args.zipf,
                clients=args.clients,
                requests=args.requests,
                capacity=args.capacity,
                load_ms=args.load_ms,
                infer_ms=args.infer_ms,
                seed=seed,
            )
            for seed in range(args.seeds)
        ]
        rate, p50, p99, miss = (statistics.mean(r[i] for r in runs) for i in range(4))
        print(f"| {name} | {rate:,.0f} | {p50:.1f} | {p99:.1f} | {miss:.3f} |", flush=True)


if __name__ == "__main__":
    main()
