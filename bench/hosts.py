"""The same inference workload through the mesh across four hosts and through `up` on one.

Run (root, iproute2): ``.venv/bin/python -m bench.hosts [--callers 1 8] [--seconds 5] [--rounds 3]``.

Starts both meshes side by side: ``meshserve hosts up`` (store on A, gateway on B,
inference units on C and D: every hop between hosts crosses a veth pair and the bridge,
sidecars STRICT) and ``meshserve up`` (everything on 127.0.0.1, two inference units), each
with the demo model trained. Then, for each number of callers, alternates rounds between the
two (A, B, A, B, ...) so that a loaded machine disturbs both alike, each round ``--callers``
closed-loop clients calling ModelInfer (one row of the demo model) through the mesh's
gateway for ``--seconds``. Reports the median round's throughput and latency percentiles
per mesh, and the ratio multi-host / one host.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from bench.children import ENV, REPO
from bench.mesh_process import MeshProcess
from cli import netns
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.support.load import demo_request

READY_TIMEOUT_S = 300.0
out = Console()


class Mesh(MeshProcess):
    """A `meshserve up` or `meshserve hosts up` subprocess and its up.json."""

    def __init__(self, label: str, command: Sequence[str], state: Path, log: Path) -> None:
        super().__init__(command, state, log, label=label)

    def cli(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=REPO,
            env={**ENV, "MESHSERVE_STATE_DIR": str(self.state)},
            check=True,
            capture_output=True,
            timeout=300,
        )


def _ready(mesh: Mesh) -> bool:
    try:
        with grpc.insecure_channel(mesh.gateway) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(demo_request(), timeout=5)
        return True
    except (OSError, ValueError, grpc.RpcError):
        return False


@dataclass(frozen=True)
class Round:
    calls: int
    failed: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def one_round(gateway: str, callers: int, seconds: float) -> Round:
    """``callers`` closed-loop clients, each on its own channel, for ``seconds``."""
    request = demo_request()
    latencies: list[list[float]] = [[] for _ in range(callers)]
    failures = [0] * callers
    start = threading.Barrier(callers + 1)
    stop_at: list[float] = []

    def caller(i: int) -> None:
        with grpc.insecure_channel(gateway) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            infer(request, timeout=10)  # connected before the clock starts
            start.wait()
            while time.monotonic() < stop_at[0]:
                began = time.perf_counter()
                try:
                    infer(request, timeout=10)
                except grpc.RpcError:
                    failures[i] += 1
                    continue
                latencies[i].append((time.perf_counter() - began) * 1000)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    stop_at.append(time.monotonic() + seconds + 0.05)
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    merged = [x for each in latencies for x in each]
    return Round(len(merged), sum(failures), elapsed, merged)


def median_round(rounds: list[Round]) -> Round:
    return sorted(rounds, key=lambda r: r.rate)[len(rounds) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason is not None:
        sys.exit(f"bench.hosts: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        hosts = Mesh("hosts", ("hosts", "up"), base / "hosts", base / "hosts.log")
        local = Mesh(
            "up",
            ("up", "--port", "0", "--demo-epochs", "1", "--inference-workers", "2"),
            base / "up",
            base / "up.log",
        )
        meshes = (hosts, local)
        try:
            with out.status("starting both meshes (up trains the demo model)"):
                for mesh in meshes:
                    mesh.wait_ready(READY_TIMEOUT_S)
                hosts.cli(
                    *("datasets", "create", "demo-blobs", "--source", "blobs"),
                    *("--num-examples", "600", "--num-classes", "3", "--num-features", "4"),
                )
                hosts.cli("train", "demo", "--dataset", "demo-blobs", "--epochs", "1")
                for mesh in meshes:
                    mesh.wait("the demo model", partial(_ready, mesh), READY_TIMEOUT_S)
            results: dict[tuple[str, int], list[Round]] = {}
            for callers in args.callers:
                for n in range(args.rounds):
                    for mesh in meshes:
                        with out.status(f"{mesh.label}: {callers} callers, round {n + 1}"):
                            results.setdefault((mesh.label, callers), []).append(
                                one_round(mesh.gateway, callers, args.seconds)
                            )
        finally:
            for mesh in meshes:
                mesh.stop()
            netns.destroy(netns.Network())
    table = Table(
        title="ModelInfer (demo model, one row) through the gateway: median of "
        f"{args.rounds} alternating rounds of {args.seconds:g} s"
    )
    for column in ("mesh", "callers", "calls/s", "p50 ms", "p99 ms", "failed", "vs one host"):
        table.add_column(column, justify="left" if column == "mesh" else "right")
    for callers in args.callers:
        one_host = median_round(results[("up", callers)])
        for label, name in (("up", "one host (up)"), ("hosts", "four hosts (hosts up)")):
            r = median_round(results[(label, callers)])
            failed = sum(x.failed for x in results[(label, callers)])
            table.add_row(
                name,
                str(callers),
                f"{r.rate:.0f}",
                f"{r.percentile(0.5):.2f}",
                f"{r.percentile(0.99):.2f}",
                str(failed),
                f"{r.rate / one_host.rate:.2f}x",
            )
    out.print(table)


if __name__ == "__main__":
    main()
