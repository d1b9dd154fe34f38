"""CPU per call of each process on the mesh path, by variant: what the relays really cost.

On a 2-core machine every process of the path shares the cores, so the mesh's throughput
is bounded by CPU per request summed over client, gateway, sidecar and worker. This
counts it directly, per process, from the kernel's accounting (``/proc/PID/stat``: user +
system time, every thread): the relay's Python, its event loop, system calls and TLS.
Unlike req/s and latency, CPU per call hardly moves with other load on the machine, so
variants compare fairly even on a busy box.

Variants (each a gateway → sidecar (mutual TLS) → one echo worker, ModelInfer): the relays
on uvloop and on asyncio's loop (``MESHSERVE_EVENT_LOOP``, mesh/server/eventloop.py);
with ``--reference DIR`` also the relays of another checkout (say, ``git worktree add
/tmp/base main``), which makes a before/after of one run. Rounds alternate the variants.

Run: ``.venv/bin/python -m bench.relay_process_cpu [--seconds 3 --rounds 3
--concurrency 32] [--reference DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.children import REPO, cpu_seconds, pid_of, process
from bench.gateway import load, wait_ready
from bench.sidecar import _gateway, _sidecar
from mesh.security.ca import CertificateAuthority
from mesh.server.eventloop import LOOP_ENV
from protos.inference import grpc_service_pb2 as pb
from registry.embedded import EmbeddedStore


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    checkout: Path
    gateway: str = ""
    sidecar: str = ""
    calls: int = 0
    rates: list[float] = field(default_factory=list)
    p50s: list[float] = field(default_factory=list)
    #: CPU seconds over all rounds: gateway, sidecar, worker.
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


async def run(args: argparse.Namespace) -> None:
    variants = [
        Variant("this checkout, relays on uvloop", {LOOP_ENV: "uvloop"}, REPO),
        Variant("this checkout, relays on asyncio's loop", {LOOP_ENV: "asyncio"}, REPO),
    ]
    if args.reference is not None:
        reference = Path(args.reference).resolve()
        variants.append(Variant(f"{reference.name}, relays on asyncio's loop", {}, reference))
    requests = [pb.ModelInferRequest(model_name="resnet", model_version=str(v)) for v in range(8)]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        store = stack.enter_context(EmbeddedStore(tmp / "store", advertise=False))
        certs = tmp / "certs"
        CertificateAuthority.create("cluster.local").save(certs)
        worker = stack.enter_context(process("bench.workers", "echo"))
        for v in variants:
            v.sidecar = _sidecar(stack, worker, store.url, certs, v.env, v.checkout)
            v.gateway = _gateway(stack, v.sidecar, certs, v.env, v.checkout)
            await wait_ready(v.gateway)
        for r in range(args.rounds):
            # Each round starts with another variant: no variant always follows the same.
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                pids = [pid_of(v.gateway), pid_of(v.sidecar), pid_of(worker)]
                before = [cpu_seconds(pid) for pid in pids]
                rate, latencies = await load(
                    v.gateway, args.concurrency, args.seconds, requests, header=True
                )
                after = [cpu_seconds(pid) for pid in pids]
                v.calls += len(latencies)
                v.rates.append(rate)
                v.p50s.append(statistics.median(latencies))
                for i in range(3):
                    v.cpu[i] += after[i] - before[i]
    print(
        f"\n## CPU per call by process: gateway → sidecar (mTLS) → echo worker, concurrency "
        f"{args.concurrency}, {args.rounds} rounds of {args.seconds:g} s\n"
    )
    print("| relays | req/s | p50 ms | gateway µs/call | sidecar µs/call | worker µs/call |")
    print("|---|---:|---:|---:|---:|---:|")
    for v in variants:
        gateway, sidecar, echo = (c / v.calls * 1e6 for c in v.cpu)
        print(
            f"| {v.name} | {statistics.median(v.rates):,.0f} | {statistics.median(v.p50s):.2f} "
            f"| {gateway:.0f} | {sidecar:.0f} | {echo:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reference", help="another checkout whose relays run as a variant")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
