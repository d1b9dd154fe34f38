"""Sidecar benchmark: what each hop and mutual TLS cost on the request path.

Paths (one echo worker, unary ModelInfer): direct; sidecar (plaintext) → worker;
gateway → worker; gateway → sidecar (plaintext) → worker; gateway → sidecar (mutual TLS,
STRICT) → worker. A second table checks the mesh path against its targets: at least 0.8 times
direct throughput at concurrency 32, both hops adding at most 0.6 ms p50 at concurrency 1,
the sidecar hop alone at most 0.3 ms.

Run: ``.venv/bin/python -m bench.sidecar [--seconds 3 --rounds 3] [--compare-loops]``.
Prints a table; figures go to docs/benchmarks.md. The relays run on the loop
mesh/server/eventloop.py picks (``MESHSERVE_EVENT_LOOP``, asyncio's by default);
``--compare-loops`` adds the gateway and mesh paths again with the relays on the other
loop (uvloop, or asyncio's when the default is uvloop), in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.children import REPO, process
from bench.gateway import Result, compare_paths, wait_ready
from mesh.security.ca import CertificateAuthority
from mesh.server.eventloop import LOOP_ENV, loop_factory
from protos.inference import grpc_service_pb2 as pb
from registry.embedded import EmbeddedStore

DIRECT = "direct"
GATEWAY = "gateway → worker"
#: The path every call through ``meshserve up``'s mesh takes.
MESH = "gateway → sidecar (mTLS) → worker"
#: The relays of --compare-loops' extra paths run on the loop the default does not pick.
OTHER_LOOP = "asyncio" if loop_factory() is not None else "uvloop"
ON_OTHER = f" [{OTHER_LOOP}]"


def _sidecar(
    stack: ExitStack,
    worker: str,
    store: str,
    certs: Path | None,
    env: dict[str, str] | None = None,
    checkout: Path = REPO,
) -> str:
    mtls = ["--mtls=STRICT", f"--certs={certs}"] if certs else ["--mtls=DISABLE"]
    address = stack.enter_context(
        process(
            "cli.main",
            "sidecar",
            "--service=inference",
            f"--app={worker}",
            f"--es={store}",
            "--prefix=bench-sidecar",
            *mtls,
            env=env,
            checkout=checkout,
        )
    )
    # Registered as localhost:<port> so the certificate's DNS name verifies.
    return "localhost:" + address.rsplit(":", 1)[1]


def _gateway(
    stack: ExitStack,
    upstream: str,
    certs: Path | None,
    env: dict[str, str] | None = None,
    checkout: Path = REPO,
) -> str:
    extra = [f"--certs={certs}"] if certs else []
    return stack.enter_context(
        process(
            "cli.main",
            "gateway",
            "--port=0",
            "--config=config",
            f"--static=inference={upstream}",
            *extra,
            env=env,
            checkout=checkout,
        )
    )


async def run(seconds: float, rounds: int, compare_loops: bool = False) -> None:
    requests = [pb.ModelInferRequest(model_name="resnet", model_version=str(v)) for v in range(8)]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        store = stack.enter_context(EmbeddedStore(tmp / "store", advertise=False))
        certs = tmp / "certs"
        CertificateAuthority.create("cluster.local").save(certs)
        worker = stack.enter_context(process("bench.workers", "echo"))
        plain_sidecar = _sidecar(stack, worker, store.url, None)
        mtls_sidecar = _sidecar(stack, worker, store.url, certs)
        paths = [
            (DIRECT, worker),
            ("sidecar → worker", plain_sidecar),
            (GATEWAY, _gateway(stack, worker, None)),
            ("gateway → sidecar → worker", _gateway(stack, plain_sidecar, None)),
            (MESH, _gateway(stack, mtls_sidecar, certs)),
        ]
        if compare_loops:
            other = {LOOP_ENV: OTHER_LOOP}
            other_sidecar = _sidecar(stack, worker, store.url, certs, other)
            paths += [
                (GATEWAY + ON_OTHER, _gateway(stack, worker, None, other)),
                (MESH + ON_OTHER, _gateway(stack, other_sidecar, certs, other)),
            ]
        for _, address in paths:
            await wait_ready(address)
        print(
            f"\n## Sidecar hop and mTLS (one echo worker, ModelInfer; median of {rounds} "
            f"rounds of {seconds:g} s)\n"
        )
        print("| path | concurrency | req/s | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|")
        table = await compare_paths(paths, requests, seconds, rounds)
    print_targets(table)
    if compare_loops:
        print_targets(table, ON_OTHER)


def print_targets(table: dict[tuple[str, int], Result], suffix: str = "") -> None:
    """The mesh path against the targets, from the same run's rows (``suffix``: the
    paths of the relays on the other loop)."""
    mesh, gateway = MESH + suffix, GATEWAY + suffix
    throughput = table[mesh, 32][0] / table[DIRECT, 32][0]
    both_hops = table[mesh, 1][1] - table[DIRECT, 1][1]
    sidecar_hop = table[mesh, 1][1] - table[gateway, 1][1]
    print(f"\n| target{suffix} | measured | goal |")
    print("|---|---:|---:|")
    print(f"| mesh path req/s ÷ direct, concurrency 32 | {throughput:.2f} | ≥ 0.80 |")
    print(f"| p50 added by both hops, concurrency 1 | {both_hops:.2f} ms | ≤ 0.6 ms |")
    print(
        f"| p50 added by the sidecar hop (mTLS), concurrency 1 | {sidecar_hop:.2f} ms | ≤ 0.3 ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compare-loops",
        action="store_true",
        help="also run the gateway and mesh paths with the relays on the other event loop",
    )
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.rounds, args.compare_loops))


if __name__ == "__main__":
    main()
