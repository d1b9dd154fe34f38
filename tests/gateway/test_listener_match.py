"""What the relay knows of the connection routes too: ``match.port`` (the listener port a
call arrived on) and ``consistentHash.useSourceIp`` (the client's address as the key)."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack

import grpc.aio

from gateway.app import Gateway
from mesh.config.loader import parse_yaml
from mesh.routing.discovery import StaticDiscovery, StaticInstance
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
