"""Gateway benchmarks: proxy overhead against direct and nginx, multi-version routing, sidecar hop.

Run: ``.venv/bin/python -m bench.gateway [--seconds 5] [--only overhead|versions|sidecar]``
(nginx from Debian's package, ``apt-get install nginx-light``, is used when installed).
Prints one table per part; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc.aio

from bench.children import process
from cli.admin_credential import admin_metadata, ensure_admin_credential
from mesh.routing import headers as md
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def nginx(upstreams: list[str]) -> Iterator[str | None]:
    """nginx as a gRPC proxy with ``hash $http_x_model_version consistent``; None if absent."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        # The comparison is the point of the table: say how to get it rather than
        # silently printing a table without the baseline.
        print(
            "nginx not found: the nginx grpc_pass row is left out. Install it with "
            "`apt-get install nginx-light` (Debian/Ubuntu) for the comparison.",
            file=sys.stderr,
        )
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        servers = "\n".join(f"    server {u};" for u in upstreams)
        conf = f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  upstream workers {{
    hash $http_x_model_version consistent;
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://workers; }}
  }}
}}
"""
        Path(tmp, "nginx.conf").write_text(conf)
        proc = subprocess.Popen(
            [binary, "-c", f"{tmp}/nginx.conf", "-p", tmp], stderr=subprocess.PIPE
        )
        try:
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


async def wait_ready(address: str) -> None:
    deadline = time.monotonic() + 20
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                await stub.ModelInfer(
                    pb.ModelInferRequest(model_name="warmup", model_version="1"), timeout=2
                )
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


async def load(
    address: str,
    concurrency: int,
    seconds: float,
    requests: list[pb.ModelInferRequest],
    header: bool,
) -> tuple[float, list[float]]:
    """Closed loop: ``concurrency`` callers back to back; returns (req/s, latencies in ms)."""
    latencies: list[float] = []
    rng = random.Random(1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < stop:
                request = rng.choice(requests)
                metadata = (
                    ((md.MODEL_VERSION, f"{request.model_name}/{request.model_version}"),)
                    if header
                    else ()
                )
                start = time.perf_counter()
                await stub.ModelInfer(request, metadata=metadata, timeout=30)
                latencies.append((time.perf_counter() - start) * 1000)

        began = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    return len(latencies) / elapsed, latencies


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else values[0]


#: One path at one concurrency: median req/s, p50 ms and p99 ms of the rounds.
Result = tuple[float, float, float]


async def compare_paths(
    paths: list[tuple[str, str]],
    requests: list[pb.ModelInferRequest],
    seconds: float,
    rounds: int,
) -> dict[tuple[str, int], Result]:
    """Prints one table row per path and concurrency: median req/s, p50 and p99 of the rounds
    (also returned, by path name and concurrency).

    Paths alternate round by round and the median round is reported: on a shared
    machine, load from other processes then hits every path alike.
    """
    table: dict[tuple[str, int], Result] = {}
    for concurrency in (1, 32):
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in paths}
        for _ in range(rounds):
            for name, address in paths:
                rate, latencies = await load(
                    address, concurrency, seconds, requests, header=name != "direct"
                )
                results[name].append((rate, percentile(latencies, 50), percentile(latencies, 99)))
        for name, runs in results.items():
            rate, p50, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
            table[name, concurrency] = (rate, p50, p99)
            print(f"| {name} | {concurrency} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |", flush=True)
    return table


async def overhead(seconds: float, rounds: int) -> None:
    print(
        f"\n## Proxy overhead (one echo worker, ModelInfer, hashed on model version; "
        f"median of {rounds} rounds of {seconds:g} s)\n"
    )
    print("| path | concurrency | req/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    requests = [
        pb.ModelInferRequest(model_name="resnet", model_version=str(v)) for v in range(1, 9)
    ]
    with ExitStack() as stack:
        worker = stack.enter_context(process("bench.workers", "echo"))
        gateway = stack.enter_context(
            process(
                "cli.main",
                "gateway",
                "--port",
                "0",
                "--config",
                "config",
                "--static",
                f"inference={worker}",
            )
        )
        nginx_address = stack.enter_context(nginx([worker]))
        paths = [("direct", worker), ("meshserve gateway", gateway)]
        if nginx_address is not None:
            paths.append(("nginx grpc_pass", nginx_address))
        for _, address in paths:
            await wait_ready(address)
        await compare_paths(paths, requests, seconds, rounds)


ROUTING = {
    "meshserve (hash, bounded load 1.25 + cold spill 2, hot keys over 2)": """
  annotations:
    meshserve.io/hash-fields: "model_name,model_version"
    meshserve.io/bounded-load: "1.25"
    meshserve.io/hot-key-replicas: "2"
    meshserve.io/hot-key-threshold: "4"
    meshserve.io/ring-points: per-endpoint
    meshserve.io/retry-order: ring-successor
spec:
  host: inference
  trafficPolicy: {loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 1024}}}}
""",
    "plain consistent hash": """
  annotations:
    meshserve.io/hash-fields: "model_name,model_version"
    meshserve.io/bounded-load: "off"
spec:
  host: inference
  trafficPolicy: {loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 1024}}}}
""",
    "round robin": """
spec:
  host: inference
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
""",
}


def zipf_requests(versions: int, s: float, count: int, seed: int = 7) -> list[pb.ModelInferRequest]:
    rng = random.Random(seed)
    weights = [1 / (rank**s) for rank in range(1, versions + 1)]
    picks = rng.choices(range(versions), weights=weights, k=count)
    return [pb.ModelInferRequest(model_name="llm", model_version=str(v + 1)) for v in picks]


async def multi_version(seconds: float, concurrency: int) -> None:
    print(
        f"\n## 50 versions, Zipf s=1.1, 4 workers holding <= 8 versions each "
        f"(load 40 ms, infer 2 ms), concurrency {concurrency}\n"
    )
    print("| routing | req/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    requests = zipf_requests(50, 1.1, 20000)
    for name, rule in ROUTING.items():
        with ExitStack() as stack:
            workers = [
                stack.enter_context(process("bench.workers", "cache", "--name", f"w{i}"))
                for i in range(4)
            ]
            static = [arg for w in workers for arg in ("--static", f"inference={w}")]
            # An admin key as `up` makes one (data plane open): Admin needs it.
            state = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            auth = ("--auth-config", str(ensure_admin_credential(state)))
            gateway = stack.enter_context(
                process("cli.main", "gateway", "--port", "0", *auth, *static)
            )
            async with grpc.aio.insecure_channel(gateway) as channel:
                yaml = f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: inference\n{rule}"
                await admin_pb2_grpc.AdminStub(channel).ApplyConfig(
                    admin_pb2.ApplyConfigRequest(yaml=yaml), metadata=admin_metadata(None, state)
                )
            await wait_ready(gateway)
            rate, latencies = await load(gateway, concurrency, seconds, requests, header=False)
            print(
                f"| {name} | {rate:,.0f} | {percentile(latencies, 50):.1f} | {percentile(latencies, 99):.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument(
        "--only",
        choices=("overhead", "versions", "sidecar"),
        help="run one part: proxy overhead vs nginx, the multi-version workload, or the "
        "cost of the sidecar hop and mTLS",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="callers in the multi-version run"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per overhead measurement")
    args = parser.parse_args()
    if args.only in (None, "overhead"):
        asyncio.run(overhead(args.seconds, args.rounds))
    if args.only in (None, "versions"):
        asyncio.run(multi_version(args.seconds, args.concurrency))
    if args.only in (None, "sidecar"):
        # Imported here: bench.sidecar builds on this module's load generator.
        from bench import sidecar

        asyncio.run(sidecar.run(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
