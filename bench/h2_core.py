"""The relay's hand-written HTTP/2 core against ``h2`` (the reference sans-I/O stack).

Run: ``.venv/bin/python -m bench.h2_core [--calls 20000]``

One run pushes the same unary gRPC call sequence (request HEADERS + DATA, response
HEADERS + DATA + trailers, N calls on one connection) through each protocol core, as
each side of a connection:

- **server side** (what the relay's ``Downstream`` is to a client): the request's bytes
  in, header block decoded, data credited back, response headers, message and trailers
  encoded and framed out;
- **client side** (what its ``Upstream`` is to a worker): request headers and message
  encoded and framed out, the response's bytes in, decoded, credited back.

(a) is ``mesh.proxy.connection`` (frames.py + hpack_codec.py, ``Side`` flow control in
stream.py) as the relay uses it; (b) is ``h2.connection.H2Connection`` (receive_data →
events, send_headers/send_data → data_to_send). The input bytes are the same for both,
encoded as gRPC's C core encodes them (incremental indexing, no Huffman). Routing, the exchange
and the event loop are not counted: bench.relay_cpu's figure for the whole relay, from
the same run, is printed beside them for scale, with what a swap would add to it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import hpack
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded

from bench.relay_cpu import BODY, REQUEST_HEADERS, RESPONSE_HEADERS, TRAILERS, MemoryTransport
from bench.relay_cpu import run as relay_run
from mesh.proxy import frames as f
from mesh.proxy.connection import Connection
from mesh.proxy.flusher import Flusher
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side

#: Both peers grant all the window there is (as relay_cpu's do): nothing ever queues.
ENDLESS = f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW}) + f.window_update(
    0, f.MAX_WINDOW - f.DEFAULT_WINDOW
)


def inputs(calls: int) -> tuple[list[bytes], list[bytes]]:
    """Each call's request bytes (for a server side) and response bytes (for a client side)."""
    client, server = hpack.Encoder(), hpack.Encoder()
    requests, responses = [], []
    for i in range(calls):
        sid = 2 * i + 1
        requests.append(
            f.headers(sid, client.encode(REQUEST_HEADERS), end_stream=False, max_size=16384)
            + f.frame(f.DATA, f.END_STREAM, sid, BODY)
        )
        responses.append(
            f.headers(sid, server.encode(RESPONSE_HEADERS), end_stream=False, max_size=16384)
            + f.frame(f.DATA, 0, sid, BODY)
            + f.headers(sid, server.encode(TRAILERS), end_stream=True, max_size=16384)
        )
    return requests, responses


class OurServer(Connection):
    """The hand-written core answering each call as soon as its request ends."""

    client_side = False

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        if stream_id not in self.streams:
            self.streams[stream_id] = Side(self, stream_id, None)

    def on_data(self, side: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        side.credit_back(flow)
        if end_stream:
            side.send_headers(RESPONSE_HEADERS, end_stream=False)
            side.send_data(BODY, end_stream=False)
            side.send_headers(TRAILERS, end_stream=True)
            side.close()


class OurClient(Connection):
    """The hand-written core reading each call's response."""

    client_side = True

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        if end_stream:
            self.streams[stream_id].close()

    def on_data(self, side: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        side.credit_back(flow)


def ours(requests: list[bytes], responses: list[bytes]) -> tuple[float, float]:
    """µs per call of the hand-written core: (server side, client side)."""
    flusher = Flusher()
    server, server_out = OurServer(flusher), MemoryTransport()
    server.connection_made(server_out)
    server.data_received(f.PREFACE + ENDLESS)
    client, client_out = OurClient(flusher), MemoryTransport()
    client.connection_made(client_out)
    client.data_received(ENDLESS)
    start = time.perf_counter()
    for request in requests:
        server.data_received(request)
    server_time = time.perf_counter() - start
    assert not server.streams and server_out.written[-1].endswith(
        f.headers(
            2 * len(requests) - 1, server.encoder.encode(TRAILERS), end_stream=True, max_size=16384
        )
    )
    start = time.perf_counter()
    for i, response in enumerate(responses):
        sid = 2 * i + 1
        # Sending runs inside an input pass in the relay (the client's request arriving).
        flusher.passes += 1
        side = client.streams[sid] = Side(client, sid, None)
        side.send_headers(REQUEST_HEADERS, end_stream=False)
        side.send_data(BODY, end_stream=True)
        flusher.passes -= 1
        flusher.flush()
        client.data_received(response)
    client_time = time.perf_counter() - start
    assert not client.streams
    return server_time / len(requests) * 1e6, client_time / len(responses) * 1e6


def h2_side(
    requests: list[bytes], responses: list[bytes], *, validate: bool
) -> tuple[float, float]:
    """µs per call of h2's H2Connection: (server side, client side)."""

    def config(client_side: bool) -> H2Configuration:
        return H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=validate,
            validate_outbound_headers=validate,
            normalize_inbound_headers=validate,
            normalize_outbound_headers=validate,
        )

    server = H2Connection(config(False))
    server.initiate_connection()
    server.receive_data(f.PREFACE + ENDLESS)
    server.data_to_send()
    out: list[bytes] = []
    start = time.perf_counter()
    for request in requests:
        for event in server.receive_data(request):
            if isinstance(event, DataReceived):
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                sid = event.stream_id
                server.send_headers(sid, RESPONSE_HEADERS)
                server.send_data(sid, BODY)
                server.send_headers(sid, TRAILERS, end_stream=True)
        out.append(server.data_to_send())
    server_time = time.perf_counter() - start
    assert not server.open_inbound_streams and out[-1]
    client = H2Connection(config(True))
    client.initiate_connection()
    client.receive_data(ENDLESS)
    client.data_to_send()
    ended = 0
    start = time.perf_counter()
    for response in responses:
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST_HEADERS)
        client.send_data(sid, BODY, end_stream=True)
        out.append(client.data_to_send())
        for event in client.receive_data(response):
            if isinstance(event, DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                ended += 1
        out.append(client.data_to_send())
    client_time = time.perf_counter() - start
    assert ended == len(responses)
    return server_time / len(requests) * 1e6, client_time / len(responses) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    rounds = 10
    per_round = args.calls // rounds
    requests, responses = inputs(per_round)
    rows: dict[str, list[tuple[float, float]]] = {"ours": [], "h2": [], "h2_loose": []}
    relay: list[float] = []
    # Interleaved rounds, median of each: other load on the machine hits every core alike.
    for _ in range(rounds):
        rows["ours"].append(ours(requests, responses))
        rows["h2"].append(h2_side(requests, responses, validate=True))
        rows["h2_loose"].append(h2_side(requests, responses, validate=False))
        relay.append(asyncio.run(relay_run(per_round, "gateway")) * 1e6)

    def med(name: str, index: int) -> float:
        return statistics.median(r[index] for r in rows[name])

    print(f"{args.calls} unary calls, {rounds} interleaved rounds, median µs per call")
    print()
    print("| protocol core | server side | client side | both (a relay's two connections) |")
    print("|---|---:|---:|---:|")
    labels = {
        "ours": "hand-written (mesh/proxy/connection.py)",
        "h2": "h2 H2Connection, default checks",
        "h2_loose": "h2 H2Connection, header validation off",
    }
    for name, label in labels.items():
        server, client = med(name, 0), med(name, 1)
        print(f"| {label} | {server:.1f} | {client:.1f} | {server + client:.1f} |")
    ours_both = med("ours", 0) + med("ours", 1)
    relay_now = statistics.median(relay)
    print()
    print("| whole relay, bench.relay_cpu gateway mode (same run) | µs per call |")
    print("|---|---:|")
    print(f"| as it is | {relay_now:.1f} |")
    for name in ("h2", "h2_loose"):
        swapped = relay_now - ours_both + med(name, 0) + med(name, 1)
        print(f"| estimated with {labels[name]} | {swapped:.1f} ({swapped / relay_now - 1:+.0%}) |")


if __name__ == "__main__":
    main()
