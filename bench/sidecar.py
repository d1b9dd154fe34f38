"""Sidecar benchmark: what each hop and mutual TLS cost on the request path.

Paths (one echo worker, unary ModelInfer): direct; gateway → worker; gateway → sidecar
(plaintext) → worker; gateway → sidecar (mutual TLS, STRICT) → worker.

Run: ``.venv/bin/python -m bench.sidecar [--seconds 3 --rounds 3]``. Prints a table;
figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.children import process
from bench.gateway import compare_paths, wait_ready
from mesh.security.ca import CertificateAuthority
from protos.inference import grpc_service_pb2 as pb
from registry.embedded import EmbeddedStore


def _sidecar(stack: ExitStack, worker: str, store: str, certs: Path | None) -> str:
    mtls = ["--mtls=STRICT", f"--certs={certs}"] if certs else ["--mtls=DISABLE"]
    address = stack.enter_context(
        process(
            "mesh.cli.main",
            "sidecar",
            "--service=inference",
            f"--app={worker}",
            f"--es={store}",
            "--prefix=bench-sidecar",
            *mtls,
        )
    )
    # Registered as localhost:<port> so the certificate's DNS name verifies.
    return "localhost:" + address.rsplit(":", 1)[1]


def _gateway(stack: ExitStack, upstream: str, certs: Path | None) -> str:
    extra = [f"--certs={certs}"] if certs else []
    return stack.enter_context(
        process(
            "mesh.cli.main",
            "gateway",
            "--port=0",
            "--config=config",
            f"--static=inference={upstream}",
            *extra,
        )
    )


async def run(seconds: float, rounds: int) -> None:
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
            ("direct", worker),
            ("gateway → worker", _gateway(stack, worker, None)),
            ("gateway → sidecar → worker", _gateway(stack, plain_sidecar, None)),
            ("gateway → sidecar (mTLS) → worker", _gateway(stack, mtls_sidecar, certs)),
        ]
        for _, address in paths:
            await wait_ready(address)
        print(
            f"\n## Sidecar hop and mTLS (one echo worker, ModelInfer; median of {rounds} "
            f"rounds of {seconds:g} s)\n"
        )
        print("| path | concurrency | req/s | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|")
        await compare_paths(paths, requests, seconds, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
