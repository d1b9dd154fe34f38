"""Registry benchmark: SIGKILL-to-removal latency seen by a watcher, and registrations per second.

Run: ``.venv/bin/python -m bench.registry`` (embedded noida-db store, or $MESHSERVE_ES_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from rich.console import Console
from rich.table import Table

from bench.children import ENV, REPO
from registry.connect import ES_URL_ENV, StoreSettings
from registry.embedded import EmbeddedStore
from registry.instances import Instance
from registry.lease import Registration
from registry.schema import Indices, ensure_schema
from registry.watch import ElasticWatcher, UpdateKind


async def worker_main(url: str, prefix: str, instance_id: str, ttl: float, interval: float) -> None:
    """The victim: registers, says so on stdout, heartbeats until killed."""
    es = StoreSettings(url).client()
    instance = Instance("bench", instance_id, f"127.0.0.1:{os.getpid()}")
    registration = Registration(es, Indices(prefix), instance, ttl=ttl, interval=interval)
    await registration.register()
    registration.start()
    print("registered", flush=True)
    await asyncio.Event().wait()


def spawn_worker(
    url: str, prefix: str, instance_id: str, ttl: float, interval: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.registry",
            "--worker",
            instance_id,
            "--es",
            url,
            "--prefix",
            prefix,
            "--ttl",
            str(ttl),
            "--heartbeat",
            str(interval),
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )


async def removal_latency(
    url: str, indices: Indices, run: int, ttl: float, heartbeat: float, watch: float
) -> float:
    """Seconds from a registered worker's SIGKILL until a watcher reports its REMOVE."""
    es = StoreSettings(url).client()
    instance_id = f"victim-{run}"
    process = spawn_worker(url, indices.prefix, instance_id, ttl, heartbeat)
    seen = asyncio.Event()
    removed_at: list[float] = []

    async def consume() -> None:
        # A task of its own, so the watcher keeps its own rhythm: polls are not phase-locked
        # to the kill (an async generator only polls while someone awaits it).
        watcher = ElasticWatcher(es, indices, service="bench", interval=watch)
        async for update in watcher.updates():
            ids = {i.instance_id for i in update.instances}
            if instance_id in ids and update.kind is not UpdateKind.REMOVE:
                seen.set()
            elif instance_id in ids:
                removed_at.append(time.monotonic())
                return

    consumer = asyncio.create_task(consume())
    try:
        await seen.wait()
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "registered"
        # A steady-state worker, killed at a random phase of its heartbeat cycle.
        await asyncio.sleep(heartbeat * random.uniform(2.0, 3.0))
        killed = time.monotonic()
        process.send_signal(signal.SIGKILL)
        await consumer
        return removed_at[0] - killed
    finally:
        consumer.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        await es.close()


async def registrations_per_second(
    url: str, indices: Indices, count: int, concurrency: int
) -> float:
    es = StoreSettings(url).client()
    semaphore = asyncio.Semaphore(concurrency)
    tag = uuid.uuid4().hex[:6]

    async def one(i: int) -> None:
        async with semaphore:
            instance = Instance("rate", f"r{tag}-{concurrency}-{i}", f"10.0.{i // 250}.{i % 250}:1")
            await Registration(es, indices, instance, ttl=30, interval=1).register()

    try:
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return count / (time.perf_counter() - start)
    finally:
        await es.close()


async def bench(args: argparse.Namespace, url: str) -> None:
    indices = Indices(f"bench-{os.getpid()}")
    es = StoreSettings(url).client()
    await ensure_schema(es, indices)
    console = Console()
    try:
        latencies = []
        for run in range(args.runs):
            latency = await removal_latency(url, indices, run, args.ttl, args.heartbeat, args.watch)
            latencies.append(latency)
            console.print(f"run {run + 1}: removed {latency:.2f}s after SIGKILL")
        rates = {
            c: await registrations_per_second(url, indices, args.registrations, c) for c in (1, 16)
        }
    finally:
        await es.indices.delete(index=",".join(indices.all()), ignore_unavailable=True)
        for name in indices.all():
            await es.indices.delete_index_template(name=name)
        await es.close()

    target = args.ttl + args.watch
    table = Table(title=f"registry ({'real cluster' if args.es_url else 'embedded noida-db'})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        "lease TTL / heartbeat / watch interval",
        f"{args.ttl:g}s / {args.heartbeat:g}s / {args.watch:g}s",
    )
    table.add_row(f"SIGKILL → REMOVE, {args.runs} runs: min", f"{min(latencies):.2f}s")
    table.add_row("  median", f"{statistics.median(latencies):.2f}s")
    table.add_row("  max", f"{max(latencies):.2f}s")
    table.add_row(
        "  target (TTL + one interval)",
        f"{target:.2f}s {'met' if max(latencies) <= target else 'MISSED'}",
    )
    for concurrency, rate in rates.items():
        table.add_row(
            f"registrations/s ({args.registrations}, concurrency {concurrency})", f"{rate:.0f}"
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=5.0)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--watch", type=float, default=1.0)
    parser.add_argument("--registrations", type=int, default=300)
    parser.add_argument("--es", dest="es_url", default=os.environ.get(ES_URL_ENV))
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--worker", metavar="ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker_main(args.es_url, args.prefix, args.worker, args.ttl, args.heartbeat))
        return
    if args.es_url:
        asyncio.run(bench(args, args.es_url))
        return
    with (
        tempfile.TemporaryDirectory() as data_dir,
        EmbeddedStore(data_dir, advertise=False) as store,
    ):
        asyncio.run(bench(args, store.url))


if __name__ == "__main__":
    main()
