"""What the relay knows of the connection and of itself routes too: ``match.port`` (the
listener port a call arrived on), ``consistentHash.useSourceIp`` (the client's address as
the key) and ``localityLbSetting`` (the gateway's locality against its endpoints')."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack

import grpc.aio

from gateway.app import Gateway
from mesh.balance.locality import REGION_LABEL, ZONE_LABEL, Locality
from mesh.config.loader import parse_yaml
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.routing.state import GatewayState
from mesh.server.app import ServerSettings
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.harness import infer, serve_workers
from tests.support.istio_yaml import lane_subsets, routed_to

BY_PORT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - match: [{port: %(port)d}]
      route: [{destination: {host: inference, subset: live}}]
    - route: [{destination: {host: inference, subset: shadow}}]
"""

BY_SOURCE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
"""


async def test_match_port_and_source_ip_hashing_through_the_gateway() -> None:
    async with AsyncExitStack() as stack:
        workers, addresses = await serve_workers(stack, 4)
        lanes = ["live", "shadow", "shadow", "shadow"]
        discovery = StaticDiscovery(
            StaticInstance("inference", w.name, a, {"lane": lane})
            for w, a, lane in zip(workers, addresses, lanes, strict=True)
        )
        gateway = Gateway(discovery, config_dir=None)
        serving = await gateway.start(ServerSettings())
        stack.push_async_callback(serving.drain, 0)
        channel = grpc.aio.insecure_channel(serving.address)
        stack.push_async_callback(channel.close)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        port = int(serving.address.rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(gateway.state.snapshot.endpoints("inference")) < 4:
            assert loop.time() < deadline, "discovery never reported the four workers"
            await asyncio.wait_for(gateway.endpoints_changed.wait(), timeout=10)

        async def answered_by(yaml: str, calls: int = 12) -> Counter[str]:
            gateway.state.apply(parse_yaml(yaml, "test.yaml"), source="test")
            replies = [(await stub.ModelInfer(infer("m"), timeout=10)).id for _ in range(calls)]
            return Counter(replies)

        # The call arrives on the gateway's listener port: the port rule takes it.
        assert await answered_by(BY_PORT % {"port": port} + "---" + lane_subsets()) == {"w0": 12}
        other = await answered_by(BY_PORT % {"port": port + 1} + "---" + lane_subsets())
        assert "w0" not in other and sum(other.values()) == 12
        # Every call comes from 127.0.0.1: one key, so one endpoint takes them all.
        assert len(await answered_by(BY_SOURCE + "---" + routed_to("inference"))) == 1


FAILOVER = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}
"""


async def test_locality_failover_through_the_gateway() -> None:
    """The gateway in us-west/zone1 keeps calls in its zone until outlier detection ejects
    the local worker, then fails over to the same region's other zone, then elsewhere."""
    async with AsyncExitStack() as stack:
        workers, addresses = await serve_workers(stack, 3)
        places = [("us-west", "zone1"), ("us-west", "zone2"), ("eu-west", "zone1")]
        discovery = StaticDiscovery(
            StaticInstance("inference", w.name, a, {REGION_LABEL: r, ZONE_LABEL: z})
            for w, a, (r, z) in zip(workers, addresses, places, strict=True)
        )
        state = GatewayState(locality=Locality("us-west", "zone1"))
        gateway = Gateway(discovery, config_dir=None, state=state)
        serving = await gateway.start(ServerSettings())
        stack.push_async_callback(serving.drain, 0)
        channel = grpc.aio.insecure_channel(serving.address)
        stack.push_async_callback(channel.close)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(gateway.state.snapshot.endpoints("inference")) < 3:
            assert loop.time() < deadline, "discovery never reported the three workers"
            await asyncio.wait_for(gateway.endpoints_changed.wait(), timeout=10)
        gateway.state.apply(
            parse_yaml(FAILOVER + "---" + routed_to("inference"), "test.yaml"), source="test"
        )

        async def answered(calls: int = 6) -> Counter[str]:
            replies = Counter[str]()
            for _ in range(calls):
                try:
                    replies[(await stub.ModelInfer(infer("m"), timeout=10)).id] += 1
                except grpc.aio.AioRpcError as exc:
                    replies[exc.code().name] += 1
            return replies

        assert await answered() == {"w0": 6}
        workers[0].fail_with = grpc.StatusCode.UNAVAILABLE
        # One failure ejects w0 (Istio's default retries then send the call on).
        assert set(await answered()) == {"w1"}
        workers[1].fail_with = grpc.StatusCode.UNAVAILABLE
        assert set(await answered()) == {"w2"}
