"""The relay's inbound mode without sockets: what a call is checked with, what the worker gets."""

from __future__ import annotations

import pytest

from mesh.errors import PermissionDenied, ResourceExhausted
from mesh.proxy.hpack_codec import Header
from mesh.proxy.inbound import ANONYMOUS, PEER_HEADER, Caller, ConcurrencyLimit, Inbound
from mesh.security.authz import RequestAttributes
from mesh.security.peer import PeerInfo

GATEWAY = "spiffe://cluster.local/ns/meshserve/sa/gateway"
MESH = Caller(PeerInfo(tls=True, verified=True, spiffe_id=GATEWAY), "10.0.0.7")
INFER = "/inference.GRPCInferenceService/ModelInfer"


def request(path: str = INFER, *extra: Header) -> list[Header]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b":authority", b"localhost:15006"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    ]


class Recorder:
    """A check that records what it was asked and refuses what it is told to."""

    def __init__(self, refuse: str | None = None) -> None:
        self.seen: list[tuple[PeerInfo, RequestAttributes]] = []
        self.refuse = refuse

    def __call__(self, peer: PeerInfo, attributes: RequestAttributes) -> None:
        self.seen.append((peer, attributes))
        if self.refuse is not None:
            raise PermissionDenied(self.refuse)


def test_the_check_sees_the_callers_identity_and_the_request() -> None:
    check = Recorder()
    inbound = Inbound("unix:/run/worker.sock", check, ConcurrencyLimit(None))
    inbound.admit(INFER, request(INFER, (b"x-model-version", b"m/7")), MESH)
    ((peer, attributes),) = check.seen
    assert peer.spiffe_id == GATEWAY
    assert attributes.path == INFER
    assert attributes.principal == "cluster.local/ns/meshserve/sa/gateway"
    assert attributes.source_namespace == "meshserve"
    assert attributes.source_ip == "10.0.0.7"
    assert attributes.host == "localhost:15006"
    assert attributes.headers["x-model-version"] == "m/7"
    assert not any(key.startswith(":") for key in attributes.headers)
    assert inbound.endpoint.address == "unix:/run/worker.sock"


def test_the_worker_gets_the_verified_identity_never_the_callers_own() -> None:
    inbound = Inbound("127.0.0.1:50051", Recorder(), ConcurrencyLimit(None))
    forged = (PEER_HEADER.encode(), b"spiffe://cluster.local/ns/meshserve/sa/admin")
    headers = inbound.admit(INFER, request(INFER, forged), MESH)
    assert headers is not None
    assert [v for n, v in headers if n == PEER_HEADER.encode()] == [GATEWAY.encode()]
    assert headers[: len(request())] == request()  # the rest as it came, in order
    anonymous = inbound.admit(INFER, request(INFER, forged), ANONYMOUS)
    assert anonymous is not None
    assert not [v for n, v in anonymous if n == PEER_HEADER.encode()]


def test_a_refused_call_takes_no_place_under_the_limit() -> None:
    limit = ConcurrencyLimit(1)
    inbound = Inbound("127.0.0.1:50051", Recorder(refuse="RBAC: access denied"), limit)
    with pytest.raises(PermissionDenied, match="RBAC: access denied"):
        inbound.admit(INFER, request(), MESH)
    assert limit.in_flight == 0


def test_the_limit_refuses_the_call_over_it() -> None:
    limit = ConcurrencyLimit(1)
    inbound = Inbound("127.0.0.1:50051", Recorder(), limit)
    assert inbound.admit(INFER, request(), MESH) is not None
    with pytest.raises(ResourceExhausted, match="concurrency limit of 1 calls"):
        inbound.admit(INFER, request(), MESH)
    limit.release()
    assert inbound.admit(INFER, request(), MESH) is not None


def test_health_is_checked_then_left_to_the_sidecars_server() -> None:
    check = Recorder()
    limit = ConcurrencyLimit(1)
    inbound = Inbound("127.0.0.1:50051", check, limit)
    assert inbound.admit("/grpc.health.v1.Health/Check", request(), MESH) is None
    assert [attributes.path for _, attributes in check.seen] == ["/grpc.health.v1.Health/Check"]
    assert limit.in_flight == 0


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
def test_reflection_goes_to_the_worker_so_clients_see_the_services_it_fronts(path: str) -> None:
    inbound = Inbound("127.0.0.1:50051", Recorder(), ConcurrencyLimit(None))
    forwarded = inbound.admit(path, request(path), MESH)
    assert forwarded is not None and (PEER_HEADER.encode(), GATEWAY.encode()) in forwarded


def test_the_average_in_flight_is_time_weighted_and_starts_over() -> None:
    now = [0.0]
    limit = ConcurrencyLimit(None, clock=lambda: now[0])
    limit.try_acquire()  # one call for the whole second
    now[0] = 0.5
    limit.try_acquire()  # a second one for half of it
    now[0] = 1.0
    assert limit.average() == 1.5
    limit.release()
    limit.release()
    now[0] = 2.0
    # Both ended at once: the next second saw none, though an instant count at 1.0 saw two.
    assert limit.average() == 0.0
    assert limit.try_acquire() and limit.average() == 1.0  # no time passed: the count now


def test_a_repeated_header_is_checked_with_all_its_values() -> None:
    # Envoy joins a repeated header's values with "," for policy matching (CVE-2020-25017):
    # keeping only the last let `x-user: admin` then `x-user: bob` dodge a DENY on
    # "admin*" while the worker still read "admin".
    check = Recorder()
    Inbound("localhost:1", check, ConcurrencyLimit(None)).admit(
        INFER, request(INFER, (b"x-user", b"admin"), (b"x-user", b"bob")), MESH
    )
    assert check.seen[0][1].headers["x-user"] == "admin,bob"
