"""Memory check by hand: many idle streams against the gateway, with and without its limits.

The attack from the issue: connections from one address, each opening thousands of
ModelInfer streams that send HEADERS and never their message. With the relay's
per-source limits the streams past them are refused (RESOURCE_EXHAUSTED), so the gateway
stops growing; the route timeout (60 s in config/inference.yaml) then answers the rest
DEADLINE_EXCEEDED and the memory they held is freed.

Run: ``.venv/bin/python -m bench.relay_idle [--connections 10] [--streams 4000] [--wait 70]``
Prints one row per gateway setting: streams sent, refused, answered by the timeout, and
the gateway's resident memory before, with the streams open, and after the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import grpc.aio

from bench.children import ENV, REPO, process
from mesh.proxy import frames as f
from mesh.proxy.hpack_codec import HeaderDecoder, HeaderEncoder
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

PATH = b"/inference.GRPCInferenceService/ModelInfer"
SETTINGS: dict[str, list[str]] = {
    "limits (defaults)": [],
    "no per-source limits": [
        "--max-streams-per-source",
        "0",
        "--max-streams",
        "0",
        "--max-connections-per-source",
        "0",
    ],
}


@contextmanager
def gateway(static: str, extra: list[str]) -> Iterator[tuple[str, int]]:
    """A gateway process: (address, pid)."""
    command = [sys.executable, "-m", "cli.main", "gateway", "--port", "0"]
    command += ["--config", str(REPO / "config"), "--static", f"inference={static}", *extra]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"the gateway did not start: {line!r}")
        yield line.split("listening on ")[1].split()[0], proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Counts:
    def __init__(self) -> None:
        self.by_status: dict[bytes, int] = {}


async def idle_streams(
    address: str, streams: int, counts: Counts
) -> tuple[asyncio.StreamWriter, asyncio.Task[None]]:
    """One connection opening ``streams`` HEADERS-only calls; its answers are counted."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    encoder, decoder = HeaderEncoder(), HeaderDecoder()
    out = [f.PREFACE, f.settings({})]
    for i in range(streams):
        block = encoder.encode(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", PATH),
                (b":authority", b"gateway"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ]
        )
        out.append(f.headers(2 * i + 1, block, end_stream=False, max_size=f.MIN_MAX_FRAME_SIZE))
    writer.write(b"".join(out))

    async def read() -> None:
        try:
            while True:
                head = await reader.readexactly(9)
                length, kind, _, _ = f.parse_header(head, 0)
                payload = await reader.readexactly(length)
                if kind == f.HEADERS:
                    status = dict(decoder.decode(payload)).get(b"grpc-status", b"-")
                    counts.by_status[status] = counts.by_status.get(status, 0) + 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    return writer, asyncio.ensure_future(read())


async def run_one(address: str, pid: int, connections: int, streams: int, wait: float) -> str:
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    await stub.ModelInfer(pb.ModelInferRequest(model_name="warm"), timeout=10)
    before = rss_mib(pid)
    counts = Counts()
    clients = [await idle_streams(address, streams, counts) for _ in range(connections)]
    await asyncio.sleep(5)
    held = rss_mib(pid)
    refused = counts.by_status.get(b"8", 0)
    await asyncio.sleep(wait)
    after = rss_mib(pid)
    timed_out = counts.by_status.get(b"4", 0)
    for writer, reader in clients:
        writer.close()
        reader.cancel()
    await channel.close()
    sent = connections * streams
    return (
        f"{sent:>8} {refused:>8} {timed_out:>9} {before:>8.0f} {held:>8.0f} {after:>8.0f}"
        f" {held - before:>+7.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--streams", type=int, default=4000)
    parser.add_argument(
        "--wait", type=float, default=70, help="seconds to wait for the route timeout (60 s)"
    )
    args = parser.parse_args()
    print(
        f"{'gateway':<22} {'streams':>8} {'refused':>8} {'timed out':>9} "
        f"{'RSS MiB':>8} {'open':>8} {'after':>8} {'growth':>7}"
    )
    with ExitStack() as stack:
        worker = stack.enter_context(process("bench.workers", "echo"))
        for name, extra in SETTINGS.items():
            with gateway(worker, extra) as (address, pid):
                row = asyncio.run(run_one(address, pid, args.connections, args.streams, args.wait))
            print(f"{name:<22} {row}", flush=True)


if __name__ == "__main__":
    main()
