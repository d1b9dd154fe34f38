"""Rules the relay carries out itself: fault delay and abort (with percentages from a
seeded source), mirroring of every call kind, response header edits."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from mesh.routing.discovery import StaticInstance
from protos.inference import grpc_service_pb2 as pb
from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc
from protos.meshserve.mesh.v1 import admin_pb2
from tests.gateway.harness import Mesh, infer, mesh
from tests.gateway.test_admin import admin
from tests.support.istio_yaml import lane_subsets

FAULT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - match: [{headers: {x-chaos: {exact: delay}}}]
      fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}
      route: [{destination: {host: inference}}]
    - match: [{headers: {x-chaos: {exact: abort}}}]
      fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}}
      route: [{destination: {host: inference}}]
    - match: [{headers: {x-chaos: {exact: half}}}]
      fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
      route: [{destination: {host: inference}}]
    - match: [{headers: {x-chaos: {exact: hold}}}]
      fault: {delay: {fixedDelay: 30s, percentage: {value: 100}}}
      route: [{destination: {host: inference}}]
    - route: [{destination: {host: inference}}]
"""


async def _until(condition: object, what: str, seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


async def _apply(m: Mesh, yaml: str) -> None:
    await admin(m.admin_channel).ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml))


def _chaos(value: str) -> tuple[tuple[str, str], ...]:
    return (("x-chaos", value),)


async def test_fault_delay_and_abort_on_the_relay() -> None:
    async with mesh(1, config_dir=None) as m:
        assert m.gateway.relay is not None
        await _apply(m, FAULT)
        loop = asyncio.get_running_loop()
        start = loop.time()
        reply = await m.inference.ModelInfer(infer("m"), metadata=_chaos("delay"), timeout=10)
        assert reply.id == "w0" and loop.time() - start >= 0.3
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("m"), metadata=_chaos("abort"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fault injected" in (caught.value.details() or "")
        # Answered by the relay: the worker never saw it.
        assert len(m.workers[0].seen) == 1


async def test_a_delayed_call_cancelled_by_its_deadline_leaves_nothing_behind() -> None:
    async with mesh(1, config_dir=None) as m:
        relay = m.gateway.relay
        assert relay is not None
        await _apply(m, FAULT)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("m"), metadata=_chaos("hold"), timeout=0.2)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # The client's RST_STREAM ended the exchange and its delay timer with it.
        await _until(lambda: not relay.exchanges, "the delayed exchange was never dropped")
        assert m.workers[0].seen == []


async def test_abort_percentage_follows_the_seeded_source() -> None:
    async with mesh(1, config_dir=None) as m:
        await _apply(m, FAULT)

        async def pattern() -> list[bool]:
            m.gateway.state.rng = random.Random(1234)
            out = []
            for _ in range(40):
                try:
                    await m.inference.ModelInfer(infer("m"), metadata=_chaos("half"), timeout=10)
                    out.append(True)
                except grpc.aio.AioRpcError as exc:
                    # httpStatus 503 is gRPC's UNAVAILABLE.
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE
                    out.append(False)
            return out

        first = await pattern()
        assert 5 <= first.count(False) <= 35, first  # Binomial(40, 0.5): 4.7 sd either side
        assert await pattern() == first  # the same seed, the same calls aborted


MIRROR = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: %(host)s}
spec:
  hosts: [%(host)s]
  http:
    - headers: {response: {set: {x-served-by: meshserve}, remove: [x-worker]}}
      mirror: {host: %(host)s, subset: shadow}
      route: [{destination: {host: %(host)s, subset: live}}]
"""


async def _mirrored(m: Mesh, shadow_address: str) -> None:
    """Worker 0 is the live lane, ``shadow_address`` the shadow of both hosts."""
    m.discovery.push(
        "reset",
        *(
            StaticInstance(service, f"{name}-{service}", address, {"lane": lane})
            for name, address, lane in (
                ("live", m.addresses[0], "live"),
                ("shadow", shadow_address, "shadow"),
            )
            for service in ("inference", "data")
        ),
    )
    await m.wait_endpoints("inference", 2)
    await _apply(
        m,
        "---\n".join(MIRROR % {"host": h} + "---" + lane_subsets(h) for h in ("inference", "data")),
    )


async def _every_kind(m: Mesh) -> None:
    """One call of each kind; asserts the client sees the live worker's answers."""
    call = m.inference.ModelInfer(infer("unary", "1"), timeout=10)
    assert (await call).id == "w0"
    headers = dict(await call.initial_metadata())
    assert headers.get("x-served-by") == "meshserve" and "x-worker" not in headers
    data = data_pb2_grpc.DataServiceStub(m.channel)
    batches = [
        b
        async for b in data.StreamBatches(
            data_pb2.StreamBatchesRequest(dataset="d", batch_size=3), timeout=10
        )
    ]
    assert [b.example_ids[0] for b in batches] == [0, 0, 0]

    async def upload() -> AsyncIterator[data_pb2.CreateDatasetRequest]:
        yield data_pb2.CreateDatasetRequest(header=data_pb2.DatasetHeader(name="digits"))
        for _ in range(2):
            yield data_pb2.CreateDatasetRequest(chunk=data_pb2.RecordChunk())

    dataset = await data.CreateDataset(upload(), timeout=10)
    assert dataset.version == "w0" and dataset.num_examples == 3

    async def stream() -> AsyncIterator[pb.ModelInferRequest]:
        for i in range(3):
            yield infer("bidi", str(i))

    replies = [r async for r in m.inference.ModelStreamInfer(stream(), timeout=10)]
    assert [r.infer_response.id for r in replies] == ["w0"] * 3


async def test_mirroring_copies_every_call_kind_and_edits_response_headers() -> None:
    async with mesh(2, config_dir=None) as m:
        live, shadow = m.workers
        await _mirrored(m, m.addresses[1])
        await _every_kind(m)
        # Unary 1 + server stream 1 + client stream 3 + bidi 3 messages, fire-and-forget.
        await _until(lambda: len(shadow.requests) == 8, f"mirror saw {shadow.requests}")
        assert [type(r).__name__ for r in shadow.requests] == [
            type(r).__name__ for r in live.requests
        ]
        assert shadow.requests == live.requests
        assert all(s.get("x-meshserve-shadow") == "1" for s in shadow.seen)
        assert not any("x-meshserve-shadow" in s for s in live.seen)
        assert {s["x-request-id"] for s in shadow.seen} == {s["x-request-id"] for s in live.seen}


async def test_a_slow_or_dead_mirror_never_slows_or_fails_the_primary() -> None:
    async with mesh(2, config_dir=None) as m:
        relay = m.gateway.relay
        assert relay is not None
        # Slow: the shadow holds every unary call; the primary answers regardless.
        m.workers[1].hold = asyncio.Event()
        await _mirrored(m, m.addresses[1])
        for _ in range(3):
            assert (await m.inference.ModelInfer(infer("m"), timeout=5)).id == "w0"
        await _until(lambda: len(m.workers[1].requests) == 3, "the slow mirror got no copies")
        m.workers[1].hold.set()
        # Dead: nothing listens where the shadow lane is; every kind still succeeds.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{sock.getsockname()[1]}"
        await _mirrored(m, dead)
        await _every_kind(m)


async def test_a_mirror_that_never_reads_is_dropped_not_buffered() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, never reads nor answers: the copy's window stays shut

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with mesh(2, config_dir=None) as m:
            relay = m.gateway.relay
            assert relay is not None
            await _mirrored(m, address)
            big = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"x" * (3 << 20)])
            # A long deadline: the copy's own (the same budget) must not be what ends it.
            assert (await m.inference.ModelInfer(big, timeout=60)).id == "w0"
            # The copy's 3 MiB could not be written: past one stream window it is reset.
            conns = [c for c in relay.pool.open if c.address == address]
            assert conns
            await _until(
                lambda: not any(c.streams for c in conns),
                "the stuck copy is still buffered",
                seconds=5.0,
            )
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_response_header_edits_apply_to_a_trailers_only_error() -> None:
    async with mesh(2, config_dir=None) as m:
        await _mirrored(m, m.addresses[1])
        m.workers[0].fail_with = grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("m"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        trailers = dict(caught.value.trailing_metadata() or ())
        assert trailers.get("x-served-by") == "meshserve"


BY_MODEL = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  gateways: [meshserve-gateway]
  http:
    - name: demo
      match: [{x-meshserve: {model: {exact: demo}}}]
      headers: {request: {set: {x-rule: demo}}}
      route: [{destination: {host: inference}}]
    - route: [{destination: {host: inference}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"""


async def test_a_rule_matches_the_model_the_first_message_names() -> None:
    # No hash fields here: the model match alone makes the relay wait for the message.
    async with mesh(2) as m:
        await _apply(m, BY_MODEL)
        for name in ("demo", "simple", "", "demo", "demos"):
            await m.inference.ModelInfer(infer(name), timeout=5)
        # Each worker records a call's metadata and its request, in order.
        ruled = [
            (request.model_name, metadata.get("x-rule"))
            for w in m.workers
            for metadata, request in zip(w.seen, w.requests, strict=True)
            if isinstance(request, pb.ModelInferRequest)
        ]
        assert sorted(ruled, key=str) == sorted(
            [("demo", "demo"), ("demo", "demo"), ("simple", None), ("", None), ("demos", None)],
            key=str,
        )

        # A stream is matched by its first message.
        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield infer("demo")

        before = [len(w.seen) for w in m.workers]
        async for _ in m.inference.ModelStreamInfer(requests(), timeout=5):
            pass
        (stream,) = [s for w, n in zip(m.workers, before, strict=True) for s in w.seen[n:]]
        assert stream.get("x-rule") == "demo"
