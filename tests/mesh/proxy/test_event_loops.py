"""The relay on each event loop it may run on: asyncio's and uvloop (mesh/server/eventloop.py).

uvloop's transports implement asyncio's interface without inheriting from it; a relay that
checked ``isinstance(transport, asyncio.Transport)`` failed every connection under it (the
TLS one first: the sidecar reset its callers). Each loop here carries a real call through
both of the relay's TLS sides: a client (plaintext) → relay A, which dials B with mutual
TLS → relay B (a sidecar's mTLS inbound) → a gRPC worker, which answers with the identity
B verified.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util

import grpc.aio
import pytest

from mesh.config.snapshot import EMPTY
from mesh.proxy.exchange import Exchange
from mesh.proxy.inbound import ConcurrencyLimit, Inbound
from mesh.proxy.relay import Relay
from mesh.routing.state import GatewayState
from mesh.security.authz import RequestAttributes
from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.security.peer import PeerInfo, check_peer
from mesh.security.rotation import CertificateSource
from mesh.server import eventloop
from mesh.server.app import ServerSettings, start_server
from tests.mesh.sidecar.worker import ECHO, Worker

TD = "cluster.local"


def _strict(peer: PeerInfo, _: RequestAttributes) -> None:
    check_peer("STRICT", peer)


def _anyone(peer: PeerInfo, _: RequestAttributes) -> None:
    pass


async def _call_through_mtls_relays(calls: int = 1) -> tuple[str, bytes, int]:
    """(the loop's module, the last reply, exchanges left alive after ``calls`` calls made
    with the cycle collector off)."""
    ca = CertificateAuthority.create(TD)
    sidecar = CertificateSource(ca, WorkloadIdentity(TD, "meshserve", "inference"))
    caller = CertificateSource(ca, WorkloadIdentity(TD, "meshserve", "gateway"))
    worker = await start_server(ServerSettings(), [Worker().service()])
    inner = Relay(
        GatewayState(EMPTY),
        internal_address=None,
        inbound=Inbound(worker.address, _strict, ConcurrencyLimit(None)),
    )
    outer = Relay(
        GatewayState(EMPTY),
        internal_address=None,
        ssl_context=caller.ssl_client_context,
        inbound=None,
    )
    try:
        port = await inner.start("127.0.0.1", 0, tls=sidecar.ssl_server_context())
        outer.inbound = Inbound(f"localhost:{port}", _anyone, ConcurrencyLimit(None))
        front = await outer.start("127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{front}") as channel:
            echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
            reply: bytes = await echo(b"hi", timeout=10)  # connections up, TLS done
            gc.collect()
            gc.disable()
            try:
                for _ in range(calls):
                    reply = await echo(b"hi", timeout=10)
                left = sum(isinstance(o, Exchange) for o in gc.get_objects())
            finally:
                gc.enable()
        return type(asyncio.get_running_loop()).__module__, reply, left
    finally:
        await outer.drain(0)
        await inner.drain(0)
        await worker.drain(grace=0)


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_a_call_crosses_the_relays_mutual_tls_on_each_loop(choice: str) -> None:
    if choice == "uvloop":
        pytest.importorskip("uvloop")
    module, reply, _ = eventloop.run(_call_through_mtls_relays(), choice=choice)
    assert module.startswith(choice)
    assert reply == b"spiffe://cluster.local/ns/meshserve/sa/gateway|hi"


def test_finished_calls_are_freed_without_the_cycle_collector() -> None:
    """A call's exchange and streams refer to each other until it ends (stream.Ended):
    left as a cycle, each call was garbage for the collector, ~10 % of a relay's CPU."""
    _, reply, left = eventloop.run(_call_through_mtls_relays(calls=20), choice="asyncio")
    assert reply.endswith(b"|hi")
    assert left == 0


def test_asyncio_is_the_default_loop_and_the_choice_is_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(eventloop.LOOP_ENV, raising=False)
    assert eventloop.loop_factory() is None  # asyncio's own
    assert eventloop.loop_factory("asyncio") is None
    monkeypatch.setenv(eventloop.LOOP_ENV, "uvloop")
    if importlib.util.find_spec("uvloop") is not None:
        assert eventloop.loop_factory() is not None
    else:
        with pytest.raises(RuntimeError, match="uvloop is not installed"):
            eventloop.loop_factory()
    monkeypatch.setenv(eventloop.LOOP_ENV, "tokio")
    with pytest.raises(ValueError, match="MESHSERVE_EVENT_LOOP='tokio'"):
        eventloop.loop_factory()
