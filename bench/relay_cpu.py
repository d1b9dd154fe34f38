"""CPU cost of the relay per proxied unary call, in its two modes, without sockets.

Run: ``.venv/bin/python -m bench.relay_cpu [--calls 20000]``

Feeds a client's HEADERS + DATA and an upstream's HEADERS, DATA and trailers (encoded as
gRPC's C core encodes them: incremental indexing, no Huffman) straight into the relay's
protocol objects with in-memory transports, and prints the relay's own Python CPU time per
call: header codec, framing and flow control, plus, as the gateway, routing (the pure
core, with the sample config's field hash) and, as a sidecar's inbound, the peer and
AuthorizationPolicy checks and the concurrency limit (TLS itself is not counted). What
the sockets and event loop add is in bench.gateway and bench.sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

import hpack

from gateway.auth import ADMIN_SCOPE, AuthConfig, ClientGuard, hash_key
from mesh.config.client_tls import ISTIO_MUTUAL
from mesh.config.loader import load_path, parse_yaml
from mesh.config.security import AuthorizationPolicy
from mesh.config.snapshot import EMPTY
from mesh.proxy import frames as f
from mesh.proxy.downstream import Downstream
from mesh.proxy.hpack_codec import Header, HeaderEncoder
from mesh.proxy.inbound import Caller, ConcurrencyLimit, Inbound
from mesh.proxy.pool import Upstream
from mesh.proxy.relay import Relay
from mesh.routing.discovery import EndpointTable, StaticDiscovery, StaticInstance
from mesh.routing.state import GatewayState
from mesh.security.authz import Authorizer, RequestAttributes
from mesh.security.peer import PeerInfo, check_peer
from mesh.security.workload import Workload
from mesh.telemetry.setup import Telemetry, TelemetrySettings, setup
from protos.inference import grpc_service_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = "127.0.0.1:9001"
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
#: The unary call both relay_cpu and bench.h2_core push through, as gRPC Python sends it.
REQUEST_HEADERS: list[Header] = [
    (b":path", INFER_PATH.encode()),
    (b":authority", b"127.0.0.1:8080"),
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
    (b"user-agent", b"grpc-python-asyncio/1.85.1 grpc-c/58.0.0 (linux; chttp2)"),
]
RESPONSE_HEADERS: list[Header] = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS: list[Header] = [(b"grpc-status", b"0")]
_MESSAGE = pb.ModelInferRequest(model_name="resnet", model_version="3").SerializeToString()
BODY = b"\x00" + len(_MESSAGE).to_bytes(4, "big") + _MESSAGE


class MemoryTransport(asyncio.Transport):
    """Collects what the relay writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        pass


#: A sidecar's policy: one DENY rule that does not match the caller, evaluated every call.
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-training-on-inference}
spec:
  selector: {matchLabels: {app: inference}}
  action: DENY
  rules: [{from: [{source: {namespaces: [ml]}}]}]
"""


async def gateway_relay(
    guard: ClientGuard | None = None, telemetry: Telemetry | None = None
) -> Relay:
    config = EMPTY.merged(load_path(REPO / "config"), version=1, source="config")
    state = GatewayState(config)
    table = EndpointTable()
    async for update in StaticDiscovery([StaticInstance("inference", "w0", UPSTREAM)]).updates():
        state.set_endpoints(table.apply(update))
        break
    return Relay(
        state,
        internal_address="127.0.0.1:1",
        guard=guard.check if guard else None,
        telemetry=telemetry,
        metrics=telemetry.metrics if telemetry is not None else None,
    )


async def sidecar_relay(telemetry: Telemetry | None = None) -> Relay:
    policies = [
        d.resource
        for d in parse_yaml(POLICY, "policy.yaml")
        if isinstance(d.resource, AuthorizationPolicy)
    ]
    authorizer = Authorizer(lambda: policies, Workload("meshserve", (("app", "inference"),)))

    def check(peer: PeerInfo, request: RequestAttributes) -> None:
        check_peer("STRICT", peer)
        authorizer.check(request)

    inbound = Inbound(UPSTREAM, check, ConcurrencyLimit(1024))
    return Relay(
        GatewayState(), internal_address="unix:/nonexistent", inbound=inbound, telemetry=telemetry
    )


async def run(
    calls: int, mode: str, guard: ClientGuard | None = None, telemetry: Telemetry | None = None
) -> float:
    relay = await (
        gateway_relay(guard, telemetry) if mode == "gateway" else sidecar_relay(telemetry)
    )
    client_side = Downstream(relay)
    down_transport = MemoryTransport()
    client_side.connection_made(down_transport)
    if relay.inbound is not None:
        # What a mutual-TLS handshake proved (the transport here has no TLS).
        spiffe = "spiffe://cluster.local/ns/meshserve/sa/gateway"
        client_side.caller = Caller(PeerInfo(tls=True, verified=True, spiffe_id=spiffe))
    # Both peers grant all the window there is, as a reader that keeps up would: the
    # relay never queues, so every call is written through.
    endless = f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW}) + f.window_update(
        0, f.MAX_WINDOW - f.DEFAULT_WINDOW
    )
    client_side.data_received(f.PREFACE + endless)
    upstream = Upstream(relay, UPSTREAM)
    # Connected by hand (no socket): the routed calls' cluster's, or the worker's.
    if relay.inbound is None:
        relay.pool.adopt(upstream, relay.state.clusters.cluster("inference"))
    else:
        relay.pool._conns[(UPSTREAM, ISTIO_MUTUAL)] = upstream
    up_transport = MemoryTransport()
    upstream.connection_made(up_transport)
    upstream.data_received(endless)

    client_encoder, server_encoder = hpack.Encoder(), hpack.Encoder()
    reply = BODY  # any gRPC message
    # The relay propagates the deadline: its cost is part of a real call's.
    request_headers = [*REQUEST_HEADERS, (b"grpc-timeout", b"29999m")]
    # What the relay sends the client as trailers (its encoding: stateless literals).
    encode_trailers = HeaderEncoder().encode(TRAILERS)[1:]
    elapsed = 0.0
    for i in range(calls):
        down_id, up_id = 2 * i + 1, 2 * i + 1
        request = f.headers(
            down_id, client_encoder.encode(request_headers), end_stream=False, max_size=16384
        ) + f.frame(f.DATA, f.END_STREAM, down_id, BODY)
        response = (
            f.headers(
                up_id, server_encoder.encode(RESPONSE_HEADERS), end_stream=False, max_size=16384
            )
            + f.frame(f.DATA, 0, up_id, reply)
            + f.headers(up_id, server_encoder.encode(TRAILERS), end_stream=True, max_size=16384)
        )
        trailer_frame = f.headers(down_id, encode_trailers, end_stream=True, max_size=16384)
        # CPU time of this thread, not wall time: on a shared machine other processes'
        # load would otherwise count as the relay's (it inflated figures 5x at load 11).
        start = time.thread_time()
        client_side.data_received(request)
        upstream.data_received(response)
        elapsed += time.thread_time() - start
        # Every call went upstream and came back, trailers included.
        assert up_transport.written, f"call {i} was not forwarded"
        assert b"".join(down_transport.written).endswith(trailer_frame), f"call {i} got no trailers"
        up_transport.written.clear()
        down_transport.written.clear()
    assert not relay.exchanges, "exchanges left open"
    return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    # What `meshserve up` runs: an admin key, the data plane open (cli/admin_credential.py).
    up_guard = ClientGuard(
        AuthConfig(
            api_keys={hash_key("msk_bench"): "local-admin"},
            key_scopes={hash_key("msk_bench"): frozenset({ADMIN_SCOPE})},
            open_data_plane=True,
        )
    )
    # Interleaved rounds, median of each: other load on the machine hits every mode alike.
    rounds = 10
    plain: list[float] = []
    guarded: list[float] = []
    inbound: list[float] = []
    # Telemetry as a sidecar runs it by default (no exporter: request metrics and the
    # caller's trace context), and with a metrics reader (MESHSERVE_METRICS=prometheus
    # reads the same in-memory reader on each scrape).
    default = setup(TelemetrySettings())
    scraped = setup(TelemetrySettings(metrics=("memory",)))
    inbound_default: list[float] = []
    inbound_metrics: list[float] = []
    gateway_metrics: list[float] = []
    for _ in range(rounds):
        plain.append(asyncio.run(run(args.calls // rounds, "gateway")))
        guarded.append(asyncio.run(run(args.calls // rounds, "gateway", up_guard)))
        inbound.append(asyncio.run(run(args.calls // rounds, "sidecar")))
        inbound_default.append(asyncio.run(run(args.calls // rounds, "sidecar", None, default)))
        inbound_metrics.append(asyncio.run(run(args.calls // rounds, "sidecar", None, scraped)))
        gateway_metrics.append(asyncio.run(run(args.calls // rounds, "gateway", None, scraped)))
    # The guard alone, as the relay calls it (its header dict built from the same request).
    metadata = {"content-type": "application/grpc", "te": "trailers", "grpc-timeout": "29999m"}
    check = min(
        timeit.repeat(
            lambda: up_guard.check(INFER_PATH, dict(metadata)), number=args.calls, repeat=5
        )
    )
    print("| relay Python, one unary call | µs per call |")
    print("|---|---:|")
    print(f"| gateway: routing + frames + headers | {statistics.median(plain) * 1e6:.1f} |")
    print(
        f"| gateway behind up's guard (admin key, data plane open) | {statistics.median(guarded) * 1e6:.1f} |"
    )
    print(f"| up's guard check alone (best of 5) | {check / args.calls * 1e6:.1f} |")
    print(
        "| sidecar inbound: peer + authz checks, limit, frames + headers | "
        f"{statistics.median(inbound) * 1e6:.1f} |"
    )
    print(
        "| sidecar inbound + default telemetry (no exporter, as `up` runs it) | "
        f"{statistics.median(inbound_default) * 1e6:.1f} |"
    )
    print(
        "| sidecar inbound + request metrics read by a reader | "
        f"{statistics.median(inbound_metrics) * 1e6:.1f} |"
    )
    print(
        "| gateway + request metrics read by a reader (no traces) | "
        f"{statistics.median(gateway_metrics) * 1e6:.1f} |"
    )


if __name__ == "__main__":
    main()
