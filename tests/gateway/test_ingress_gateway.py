"""A real gateway as the ingress a Gateway selects: VirtualServices bound to it route there,
those bound only to ``mesh`` do not, and hosts its servers do not expose have no route."""

from __future__ import annotations

from contextlib import AsyncExitStack

import grpc
import grpc.aio
import pytest

from mesh.config.views import ingress_view
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.sidecar.outbound import Outbound
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway.harness import REPO, infer, mesh


def inference_rules(gateways: str) -> str:
    """The shipped inference VirtualService, bound to ``gateways`` instead."""
    text = (REPO / "config" / "inference.yaml").read_text().split("---\n", 1)[0]
    shipped = "  gateways:\n    - meshserve-gateway\n    - mesh\n"
    assert shipped in text
    return text.replace(shipped, f"  gateways: {gateways}\n")


async def test_a_virtual_service_bound_only_to_mesh_does_not_route_at_the_ingress() -> None:
    async with mesh(2) as m:
        # Listening on any free port, the gateway is the ingress on 8080 (its default),
        # the port config/gateway.yaml's server names.
        assert m.gateway.state.view == ingress_view(port=8080)
        stub = admin_pb2_grpc.AdminStub(m.admin_channel)
        assert (await m.inference.ModelInfer(infer("demo"), timeout=5)).model_name == "demo"

        await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=inference_rules("[mesh]")))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("demo"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert caught.value.details() == (
            "no route: no VirtualService bound to Gateway/meshserve-gateway (meshserve) "
            "routes host 'inference'"
        )
        # The sidecars' view still routes it, and route explain says which view it shows.
        in_mesh = await stub.ExplainRoute(admin_pb2.ExplainRouteRequest(view="mesh"))
        assert in_mesh.route == "VirtualService/inference http[0] (infer)"
        assert in_mesh.steps[0] == "view mesh: the sidecars' rules"

        await stub.ApplyConfig(
            admin_pb2.ApplyConfigRequest(yaml=inference_rules("[meshserve-gateway]"))
        )
        assert (await m.inference.ModelInfer(infer("demo"), timeout=5)).model_name == "demo"
        here = await stub.ExplainRoute(admin_pb2.ExplainRouteRequest())
        assert here.steps[0].startswith("view ingress (labels app=gateway,")
        bound = await stub.ExplainRoute(admin_pb2.ExplainRouteRequest(view="meshserve-gateway"))
        assert bound.route == here.route == "VirtualService/inference http[0] (infer)"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ExplainRoute(admin_pb2.ExplainRouteRequest(view="ops/edge"))
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert "no Gateway 'ops/edge'" in (missing.value.details() or "")


async def test_a_host_the_gateway_does_not_expose_answers_unimplemented_naming_it() -> None:
    gateway_yaml = (REPO / "config" / "gateway.yaml").read_text()
    only_data = gateway_yaml.replace("        - ./inference.meshserve.svc.cluster.local\n", "")
    assert only_data != gateway_yaml
    async with mesh(2) as m:
        stub = admin_pb2_grpc.AdminStub(m.admin_channel)
        await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=only_data))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("demo"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert caught.value.details() == (
            "no route: host 'inference' is not among the hosts of "
            "Gateway/meshserve-gateway (meshserve) on port 8080"
        )
        # The gateway's own services (Admin here) are not mesh hosts: unaffected.
        assert (await stub.DumpConfig(admin_pb2.DumpConfigRequest())).version > 0


#: Istio's most common split: the host's rules for the ingress in one VirtualService (bound
#: to the Gateway), those for the sidecars in another (no ``gateways``: mesh). Each marks
#: the replies it routes, so a client sees which one its hop applied.
SPLIT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  gateways: [meshserve-gateway]
  http:
    - name: edge
      headers: {response: {set: {x-routed-by: ingress}}}
      route: [{destination: {host: inference}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference-mesh}
spec:
  hosts: [inference.meshserve.svc.cluster.local]
  http:
    - name: sidecar
      headers: {response: {set: {x-routed-by: mesh}}}
      route: [{destination: {host: inference}}]
"""


async def routed_by(channel: grpc.aio.Channel) -> tuple[str, str]:
    """Which VirtualService's rule routed a call through ``channel`` (its response header),
    and the worker that answered."""
    call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer("demo"), timeout=10)
    reply = await call
    marks = [v for k, v in (await call.initial_metadata()) or () if k == "x-routed-by"]
    return ",".join(str(m) for m in marks), reply.id


async def test_one_host_split_routes_the_ingress_by_its_gateway_rules_and_sidecars_by_mesh() -> (
    None
):
    async with mesh(2) as m, AsyncExitStack() as stack:
        stub = admin_pb2_grpc.AdminStub(m.admin_channel)
        await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=SPLIT))
        mark, worker = await routed_by(m.channel)
        assert mark == "ingress" and worker in {"w0", "w1"}
        here = await stub.ExplainRoute(admin_pb2.ExplainRouteRequest())
        assert here.route == "VirtualService/inference http[0] (edge)"
        in_mesh = await stub.ExplainRoute(admin_pb2.ExplainRouteRequest(view="mesh"))
        assert in_mesh.route == "VirtualService/inference-mesh http[0] (sidecar)"

        # A sidecar's outbound over the same workers, with the same config: the mesh one.
        outbound = Outbound(
            StaticDiscovery([StaticInstance("inference", "i0", m.addresses[0])]),
            reload_interval=0.05,
        )
        address = await outbound.start(0)
        stack.push_async_callback(outbound.drain, 0)
        gateway_yaml = (REPO / "config" / "gateway.yaml").read_text()
        await outbound.pipeline.apply(
            f"{gateway_yaml}---\n{SPLIT}", expected_version=0, dry_run=False
        )
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        assert await routed_by(channel) == ("mesh", "w0")
