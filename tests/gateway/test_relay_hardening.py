"""The relay against an attacker: malformed calls answered by the relay without costing a
worker anything, idle connections and streams closed at their timeouts, and per-source
limits that make one client's abuse cost that client (raw HTTP/2 clients, real workers)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gateway.app import Gateway
from mesh.proxy import frames as f
from mesh.proxy.hpack_codec import Header
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.routing.limits import RelayLimits
from mesh.server.app import ServerSettings, Serving
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.backends import FakeWorker
from tests.gateway.harness import serve_workers
from tests.gateway.test_relay import until
from tests.gateway.test_relay_protocol import ABUSER, RawClient, connect_raw

INFER = "/inference.GRPCInferenceService/ModelInfer"
READY = "/inference.GRPCInferenceService/ModelReady"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"

#: One error of either kind ejects a worker: any error wrongly counted against one shows.
CONFIG = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - name: infer
      match: [{uri: {prefix: /inference.GRPCInferenceService/ModelInfer}}]
      timeout: 1s
      route: [{destination: {host: inference}}]
    - name: control
      route: [{destination: {host: inference}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 1
      consecutiveGatewayErrors: 1
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 100
"""
#: The same, but the ring hashes on the first message's fields: routing waits for it.
HASHED = CONFIG.replace(
    "metadata: {name: inference}\nspec:\n  host: inference\n  trafficPolicy:\n",
    "metadata:\n  name: inference\n"
    '  annotations: {meshserve.io/hash-fields: "model_name,model_version"}\n'
    "spec:\n  host: inference\n  trafficPolicy:\n"
    "    loadBalancer: {consistentHash: {httpHeaderName: x-model-version}}\n",
)


@dataclass
class Edge:
    gateway: Gateway
    serving: Serving
    workers: list[FakeWorker]
    addresses: list[str]
    channel: grpc.aio.Channel

    @property
    def inference(self) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    def untouched(self) -> bool:
        """No worker has an error counted or is ejected."""
        cluster = self.gateway.state.clusters.cluster("inference")
        assert cluster.outliers is not None
        return all(
            not (state := cluster.outliers.state(a)).ejected and state.consecutive_errors == 0
            for a in self.addresses
        )


@asynccontextmanager
async def edge(
    tmp_path: Path, limits: RelayLimits | None = None, config: str = CONFIG, n: int = 2
) -> AsyncIterator[Edge]:
    (tmp_path / "inference.yaml").write_text(config)
    async with AsyncExitStack() as stack:
        workers, addresses = await serve_workers(stack, n)
        gateway = Gateway(
            StaticDiscovery(
                [
                    StaticInstance("inference", w.name, a)
                    for w, a in zip(workers, addresses, strict=True)
                ]
            ),
            config_dir=tmp_path,
            relay_limits=limits,
        )
        serving = await gateway.start(ServerSettings())
        channel = grpc.aio.insecure_channel(serving.address)
        try:
            await until(lambda: len(gateway.state.snapshot.endpoints("inference")) == n)
            yield Edge(gateway, serving, workers, addresses, channel)
        finally:
            for worker in workers:
                if worker.hold is not None:
                    worker.hold.set()
            await channel.close()
            await serving.drain(grace=0)


def _send(
    raw: RawClient, stream_id: int, path: str, headers: Sequence[Header], *, end: bool
) -> None:
    block = raw.encoder.encode([(b":path", path.encode()), *headers])
    raw.send(f.headers(stream_id, block, end_stream=end, max_size=f.MIN_MAX_FRAME_SIZE))


BASE: list[Header] = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"gateway"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def _without(name: bytes, *extra: Header) -> list[Header]:
    return [h for h in BASE if h[0] != name] + list(extra)


def _message(payload: bytes, *, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(payload).to_bytes(4, "big") + payload


def _status(trailers: bytes | None) -> int | None:
    if trailers is None:
        return None
    for line in trailers.split(b"\n"):
        if line.startswith(b"grpc-status: "):
            return int(line.split(b": ", 1)[1])
    return None


REQUEST = pb.ModelInferRequest(model_name="m").SerializeToString()

# (name, headers, body frames after HEADERS (None: END_STREAM on HEADERS), status, words)
MALFORMED: list[tuple[str, list[Header], list[bytes] | None, grpc.StatusCode, bytes]] = [
    ("no te", _without(b"te"), [_message(REQUEST)], grpc.StatusCode.INTERNAL, b"te: trailers"),
    (
        "json",
        _without(b"content-type", (b"content-type", b"application/json")),
        [_message(REQUEST)],
        grpc.StatusCode.UNIMPLEMENTED,
        b"gRPC only",
    ),
    (
        "compressed, no encoding",
        BASE,
        [_message(REQUEST, compressed=True)],
        grpc.StatusCode.INTERNAL,
        b"compressed",
    ),
    (
        "unknown encoding",
        [*BASE, (b"grpc-encoding", b"snappy")],
        [_message(REQUEST, compressed=True)],
        grpc.StatusCode.UNIMPLEMENTED,
        b"snappy",
    ),
    ("END_STREAM, no message", BASE, None, grpc.StatusCode.INTERNAL, b"without a message"),
    ("empty DATA ends it", BASE, [b""], grpc.StatusCode.INTERNAL, b"without a message"),
    (
        "GET",
        _without(b":method", (b":method", b"GET")),
        None,
        grpc.StatusCode.UNIMPLEMENTED,
        b"gRPC only",
    ),
    (
        "ftp",
        _without(b":scheme", (b":scheme", b"ftp")),
        [_message(REQUEST)],
        grpc.StatusCode.INTERNAL,
        b":scheme",
    ),
    # Forwarded, these made the worker's gRPC server answer INTERNAL ("Illegal header
    # key"), which ejected it: header names gRPC and HTTP/2 forbid.
    (
        "upper-case name",
        [*BASE, (b"X-Model-Version", b"1")],
        [_message(REQUEST)],
        grpc.StatusCode.INTERNAL,
        b"header name 'X-Model-Version'",
    ),
    (
        "empty name",
        [*BASE, (b"", b"x")],
        [_message(REQUEST)],
        grpc.StatusCode.INTERNAL,
        b"header name ''",
    ),
    (
        "connection-specific",
        [*BASE, (b"connection", b"close")],
        [_message(REQUEST)],
        grpc.StatusCode.INTERNAL,
        b"connection-specific",
    ),
    # Was ignored (the call ran without a deadline), where a gRPC server answers INTERNAL.
    (
        "malformed grpc-timeout",
        [*BASE, (b"grpc-timeout", b"1.5S")],
        [_message(REQUEST)],
        grpc.StatusCode.INTERNAL,
        b"grpc-timeout '1.5S'",
    ),
    (
        "unknown pseudo-header",
        [*BASE, (b":foo", b"x")],
        [_message(REQUEST)],
        grpc.StatusCode.INTERNAL,
        b"pseudo-header ':foo'",
    ),
]


async def test_malformed_calls_are_answered_by_the_relay_and_never_count_against_a_worker(
    tmp_path: Path,
) -> None:
    """The issue's attack: each of these ejected a healthy worker (consecutive errors 1
    here). The relay answers them itself; outlier detection never hears of them."""
    async with edge(tmp_path) as e, connect_raw(e.serving.address) as raw:
        for i, (name, headers, body, code, words) in enumerate(MALFORMED * 3):
            sid = 2 * i + 1
            _send(raw, sid, INFER, headers, end=body is None)
            for n, chunk in enumerate(body or ()):
                last = n == len(body or ()) - 1
                raw.send(f.frame(f.DATA, f.END_STREAM if last else 0, sid, chunk))
            _, trailers = await raw.until_end(sid)
            assert _status(trailers) == code.value[0], name
            assert trailers is not None and words in trailers, (name, trailers)
        # A path that names no method.
        _send(raw, 1001, "/inference.GRPCInferenceService/ModelInfer/x", BASE, end=False)
        _, trailers = await raw.until_end(1001)
        assert _status(trailers) == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert trailers is not None and b"malformed method path" in trailers
        assert e.untouched()
        # Nothing reached a worker's handler, and both still serve.
        assert not any(w.seen for w in e.workers)
        stub = e.inference
        replies = {
            (await stub.ModelInfer(pb.ModelInferRequest(model_name=f"m{i}"))).id for i in range(8)
        }
        assert replies == {"w0", "w1"}


@pytest.mark.parametrize("config", [CONFIG, HASHED], ids=["routed", "waiting-for-message"])
async def test_a_call_that_never_sends_its_message_ends_at_the_route_timeout_uncounted(
    tmp_path: Path, config: str
) -> None:
    """HEADERS only on a route with a 1 s timeout: DEADLINE_EXCEEDED from the call's first
    byte, not the worker's fault (consecutiveGatewayErrors 1 would eject it) — whether the
    call was routed at once or waits for the message its ring hashes on."""
    async with edge(tmp_path, config=config) as e, connect_raw(e.serving.address) as raw:
        relay = e.gateway.relay
        assert relay is not None
        assert relay.needs_message(INFER) is (config is HASHED)
        start = asyncio.get_running_loop().time()
        for sid in (1, 3, 5):
            _send(raw, sid, INFER, BASE, end=False)
        for sid in (1, 3, 5):
            _, trailers = await raw.until_end(sid)
            assert _status(trailers) == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert asyncio.get_running_loop().time() - start < 20  # not the 300 s idle timeout
        assert e.untouched()
        await until(lambda: not relay.exchanges)


SHORT = RelayLimits(
    request_headers_timeout=0.5, stream_idle_timeout=1.0, idle_timeout=1.5, abuse_cool_off=30
)


async def _eof_or_goaway(raw: RawClient) -> tuple[int, bytes] | None:
    """Reads to the relay's GOAWAY ((code, debug text)) or to EOF (None)."""
    while True:
        got = await raw.next_frame(timeout=20)
        if got is None:
            return None
        kind, _, _, payload = got
        if kind == f.GOAWAY:
            return f.parse_goaway(payload)[1], payload[8:]


async def test_idle_connections_and_streams_are_closed_at_their_timeouts(tmp_path: Path) -> None:
    async with edge(tmp_path, SHORT) as e:
        relay = e.gateway.relay
        assert relay is not None
        # A connection that sends nothing at all: closed at request_headers_timeout.
        async with connect_raw(e.serving.address, preface=False) as silent:
            assert await _eof_or_goaway(silent) in (
                None,
                (f.NO_ERROR, b"no request headers within 0.5s"),
            )
        # The preface and SETTINGS, then nothing: the same.
        async with connect_raw(e.serving.address) as quiet:
            assert await _eof_or_goaway(quiet) == (f.NO_ERROR, b"no request headers within 0.5s")
        # A stream that sends only HEADERS on a route with no timeout: the stream idle
        # timeout ends it (DEADLINE_EXCEEDED), uncounted; then the connection, without
        # streams, is closed at the idle timeout.
        async with connect_raw(e.serving.address) as idle:
            _send(idle, 1, STREAM, BASE, end=False)
            _, trailers = await idle.until_end(1)
            assert trailers is not None and b"stream idle for 1s" in trailers
            assert _status(trailers) == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert await _eof_or_goaway(idle) == (f.NO_ERROR, b"idle for 1.5s")
        # A header block whose CONTINUATION never comes: closed at request_headers_timeout.
        async with connect_raw(e.serving.address) as split:
            _send(split, 1, INFER, _without(b"te"), end=True)  # answered at once
            _, trailers = await split.until_end(1)
            assert _status(trailers) == grpc.StatusCode.INTERNAL.value[0]
            block = split.encoder.encode([(b":path", INFER.encode()), *BASE])
            split.send(f.frame(f.HEADERS, 0, 3, block[:10]))  # no END_HEADERS
            assert await _eof_or_goaway(split) == (
                f.NO_ERROR,
                b"a header block not completed within 0.5s",
            )
        assert e.untouched()
        await until(lambda: not relay.downstreams and relay.limiter.total_streams == 0)
        assert relay.limiter.connections == {}


async def test_a_connection_past_its_max_duration_is_told_goaway_and_drains(
    tmp_path: Path,
) -> None:
    limits = RelayLimits(max_connection_duration=1.0)
    async with edge(tmp_path, limits) as e, connect_raw(e.serving.address) as raw:
        _send(raw, 1, STREAM, BASE, end=False)  # open, no message yet
        got = await raw.next_frame(timeout=20)
        while got is not None and got[0] != f.GOAWAY:
            got = await raw.next_frame(timeout=20)
        assert got is not None and f.parse_goaway(got[3]) == (1, f.NO_ERROR)
        # A new stream is refused; the one in flight still completes; then it closes.
        _send(raw, 3, STREAM, BASE, end=False)
        refused = await raw.next_frame()
        while refused is not None and refused[2] != 3:
            refused = await raw.next_frame()
        assert refused is not None and refused[0] == f.RST_STREAM
        assert f.parse_u32(refused[3]) == f.REFUSED_STREAM
        request = pb.ModelInferRequest(model_name="m").SerializeToString()
        raw.send(f.frame(f.DATA, f.END_STREAM, 1, _message(request)))
        data, trailers = await raw.until_end(1)
        assert _status(trailers) == 0 and data
        assert await raw.next_frame() is None  # closed once its last stream ended


async def test_per_source_limits_hold_while_another_client_keeps_its_throughput(
    tmp_path: Path,
) -> None:
    limits = RelayLimits(max_streams_per_source=8, max_connections_per_source=2)
    async with edge(tmp_path, limits) as e:
        relay = e.gateway.relay
        assert relay is not None
        async with (
            connect_raw(e.serving.address, source=ABUSER) as a,
            connect_raw(e.serving.address, source=ABUSER) as b,
        ):
            # Held streams (HEADERS only, no route timeout) up to the source's limit...
            for sid in range(1, 17, 2):
                _send(a, sid, STREAM, BASE, end=False)
            await until(lambda: relay.limiter.streams.get(ABUSER) == 8)
            # ...and past it, on either connection: answered RESOURCE_EXHAUSTED.
            _send(b, 1, STREAM, BASE, end=False)
            _, trailers = await b.until_end(1)
            assert _status(trailers) == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert trailers is not None and b"127.0.0.2 has 8 streams open" in trailers
            # Answered by the relay before any exchange, yet with the call's id.
            assert re.search(rb"^x-request-id: [0-9a-f]{32}$", trailers, flags=re.MULTILINE)
            # A third connection from the same address is refused outright.
            async with connect_raw(e.serving.address, source=ABUSER) as c:
                assert await _eof_or_goaway(c) == (
                    f.ENHANCE_YOUR_CALM,
                    b"127.0.0.2 has 2 connections open",
                )
            stub = e.inference
            # Meanwhile another client's calls all complete (5 at a time: under the same
            # per-source limit, which the abuser's streams do not eat into).
            done = []
            for batch in range(10):
                done += await asyncio.gather(
                    *(
                        stub.ModelInfer(pb.ModelInferRequest(model_name=f"m{i}"), timeout=20)
                        for i in range(5 * batch, 5 * batch + 5)
                    )
                )
            assert [r.model_name for r in done] == [f"m{i}" for i in range(50)]
            assert relay.limiter.streams.get(ABUSER) == 8
        await until(lambda: relay.limiter.total_streams == 0)


#: No route timeout (held streams stay held) and a circuit breaker of 4 calls in flight.
SHARED = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http: [{route: [{destination: {host: inference}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 4}}}
"""


async def test_one_source_cannot_fill_a_destinations_circuit_breaker(tmp_path: Path) -> None:
    """A client holding calls open (headers sent, its message never) gets at most its
    share of http2MaxRequests (ceil(4 x 0.75) = 3): the fourth call stays for the others."""
    async with (
        edge(tmp_path, config=SHARED) as e,
        connect_raw(e.serving.address, source=ABUSER) as a,
    ):
        relay = e.gateway.relay
        assert relay is not None
        tracker, cluster = e.gateway.state.tracker, e.gateway.state.clusters.cluster("inference")
        for sid in (1, 3, 5):
            _send(a, sid, INFER, BASE, end=False)
        await until(lambda: tracker.total(cluster.healthy) == 3)
        _send(a, 7, INFER, BASE, end=False)
        _, trailers = await a.until_end(7)
        assert _status(trailers) == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert trailers is not None and b"127.0.0.2 holds 3 calls" in trailers
        # Another client's call takes the fourth place and completes.
        reply = await e.inference.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=20)
        assert reply.model_name == "m"
        assert tracker.total(cluster.healthy) == 3  # the abuser's three, still held
        assert relay.limiter.refused.get("source_share") == 1


@pytest.mark.parametrize("path", [STREAM])
async def test_a_bidi_stream_may_end_without_a_message(tmp_path: Path, path: str) -> None:
    """Client streaming methods are not judged by message count."""
    async with edge(tmp_path) as e, connect_raw(e.serving.address) as raw:
        _send(raw, 1, path, BASE, end=True)
        _, trailers = await raw.until_end(1)
        assert _status(trailers) == 0


#: One worker, no retries, ejected after two server errors in a row.
TWO_STRIKES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - retries: {attempts: 0}
      route: [{destination: {host: inference}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 30s,
                       maxEjectionPercent: 100}
"""


async def test_a_client_cancellation_neither_counts_nor_forgives(tmp_path: Path) -> None:
    """A cancel is the client's doing: it must not count against the worker, nor reset
    its run of errors (else a client could keep a failing worker in service)."""
    async with edge(tmp_path, config=TWO_STRIKES, n=1) as e, connect_raw(e.serving.address) as raw:
        worker, address = e.workers[0], e.addresses[0]
        cluster = e.gateway.state.clusters.cluster("inference")
        assert cluster.outliers is not None
        worker.fail_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await e.inference.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=10)
        assert cluster.outliers.state(address).consecutive_errors == 1
        # A call the worker is holding, cancelled by the client.
        worker.fail_with, worker.hold = None, asyncio.Event()
        seen = len(worker.seen)
        _send(raw, 1, INFER, BASE, end=False)
        raw.send(f.frame(f.DATA, f.END_STREAM, 1, _message(REQUEST)))
        await until(lambda: len(worker.seen) > seen)
        raw.send(f.rst_stream(1, f.CANCEL))
        relay = e.gateway.relay
        assert relay is not None
        await until(lambda: not relay.exchanges)
        assert cluster.outliers.state(address).consecutive_errors == 1
        # The second error in a row ejects it.
        worker.hold.set()
        worker.fail_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await e.inference.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=10)
        assert cluster.outliers.state(address).ejected
