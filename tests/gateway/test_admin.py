"""The Admin API and edge behaviour through a running gateway: config, explain, rings, canary."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from mesh.routing.discovery import StaticInstance
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway.harness import REPO, infer, mesh
from tests.support.istio_yaml import lane_subsets, routed_to, version_subsets

CANARY = (REPO / "config" / "examples" / "canary-90-10.yaml").read_text()

FAULT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  gateways: [meshserve-gateway]
  http:
    - fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 25}}}
      route: [{destination: {host: inference}}]
"""


def admin(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminAsyncStub:
    return admin_pb2_grpc.AdminStub(channel)


async def test_apply_canary_splits_demo_90_10_through_the_gateway() -> None:
    async with mesh() as m:
        stub = admin(m.admin_channel)
        before = await stub.DumpConfig(admin_pb2.DumpConfigRequest())
        applied = await stub.ApplyConfig(
            admin_pb2.ApplyConfigRequest(yaml=CANARY, expected_version=before.version)
        )
        assert applied.version == before.version + 1 and list(applied.resources) == [
            "VirtualService/inference"
        ]
        versions: Counter[str] = Counter()
        workers_by_version: dict[str, set[str]] = {}
        for _ in range(2000):
            reply = await m.inference.ModelInfer(infer("demo"), timeout=5)
            versions[reply.model_version] += 1
            workers_by_version.setdefault(reply.model_version, set()).add(reply.id)
        assert set(versions) == {"1", "2"}
        assert versions["2"] / 2000 == pytest.approx(0.10, abs=0.03)
        # Each version's key keeps it on one worker.
        assert all(len(ws) == 1 for ws in workers_by_version.values())
        # Another model is not touched: no version header reaches its worker.
        before_simple = [len(w.seen) for w in m.workers]
        for _ in range(200):
            reply = await m.inference.ModelInfer(infer("simple"), timeout=5)
            assert reply.model_version == ""
        simple_calls = [
            metadata
            for w, start in zip(m.workers, before_simple, strict=True)
            for metadata in w.seen[start:]
        ]
        assert len(simple_calls) == 200
        assert not any("x-model-version" in metadata for metadata in simple_calls)


async def test_fault_injection_hits_its_percentage() -> None:
    async with mesh(2) as m:
        await admin(m.admin_channel).ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=FAULT))
        codes: Counter[grpc.StatusCode] = Counter()
        for _ in range(800):
            try:
                await m.inference.ModelInfer(infer("m", "1"), timeout=5)
                codes[grpc.StatusCode.OK] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code()] += 1
                assert error.details() == "fault injected by VirtualService/inference http[0]"
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] / 800 == pytest.approx(0.25, abs=0.05)
        # Aborted calls never reach a worker.
        assert sum(len(w.seen) for w in m.workers) == codes[grpc.StatusCode.OK]


async def test_rejected_apply_keeps_the_running_config_and_is_shown() -> None:
    async with mesh(1) as m:
        stub = admin(m.admin_channel)
        version = (await stub.DumpConfig(admin_pb2.DumpConfigRequest())).version
        # Istio refuses only weights that sum to 0 (any other sum is relative).
        bad = CANARY.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 0")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=bad))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (
            "admin: VirtualService/inference: spec.http[0].route: destination weights sum "
            "to 0: no destination would get any traffic"
        )
        dump = await stub.DumpConfig(admin_pb2.DumpConfigRequest())
        assert dump.version == version
        assert dump.last_rejection.error == caught.value.details()
        assert {(r.kind, r.name) for r in dump.resources} >= {
            ("VirtualService", "inference"),
            ("DestinationRule", "inference"),
        }
        assert "consistentHash" in next(
            r.yaml for r in dump.resources if r.kind == "DestinationRule" and r.name == "inference"
        )
        # Optimistic concurrency and dry runs.
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await stub.ApplyConfig(
                admin_pb2.ApplyConfigRequest(yaml=CANARY, expected_version=version + 7)
            )
        assert conflict.value.code() is grpc.StatusCode.ABORTED
        dry = await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=CANARY, dry_run=True))
        assert dry.version == version
        assert (await stub.DumpConfig(admin_pb2.DumpConfigRequest())).version == version


@pytest.mark.parametrize("text", ["", "---\n---\n", "# only a comment\n"])
async def test_an_apply_with_no_resources_is_refused_and_makes_no_version(text: str) -> None:
    """As ``kubectl apply`` refuses "no objects passed to apply": an empty file made a new
    config version identical to the running one, so the ``config rollback`` after it
    restored nothing the operator could see."""
    async with mesh(1) as m:
        stub = admin(m.admin_channel)
        version = (await stub.DumpConfig(admin_pb2.DumpConfigRequest())).version
        for dry_run in (True, False):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=text, dry_run=dry_run))
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == "admin: no resources to apply"
        assert (await stub.DumpConfig(admin_pb2.DumpConfigRequest())).version == version


async def test_an_error_quoting_a_huge_value_keeps_its_status_and_is_cut_short() -> None:
    """A ConfigError quotes the offending value: one of 4 MB made a grpc-message no
    header block could carry, and the call failed UNAVAILABLE ("connection closed",
    "reset the stream") instead of INVALID_ARGUMENT."""
    huge = "a" * 1_000_000
    yaml_text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {huge}}}\nspec: {{hosts: [x]}}\n"
    )
    async with mesh(1) as m:
        stub = admin(m.admin_channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml_text, dry_run=True))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert details.startswith("admin: VirtualService/aaa")
        assert 1000 < len(details.encode()) <= 2048 and details.endswith("bytes cut)")


async def test_explain_route_ring_and_endpoints_agree_with_real_routing() -> None:
    async with mesh() as m:
        stub = admin(m.admin_channel)
        explained = await stub.ExplainRoute(
            admin_pb2.ExplainRouteRequest(model_name="resnet", model_version="3")
        )
        assert (
            explained.hash_key == "resnet/3"
            and explained.hash_source == "fields model_name+model_version"
        )
        assert explained.route == "VirtualService/inference http[0] (infer)"
        assert len(explained.candidates) == 3 and explained.candidates[0] == explained.endpoint
        assert any("hash key 'resnet/3'" in s for s in explained.steps)
        reply = await m.inference.ModelInfer(infer("resnet", "3"), timeout=5)
        assert m.addresses[[w.name for w in m.workers].index(reply.id)] == explained.endpoint

        ring = await stub.GetRing(
            admin_pb2.GetRingRequest(
                host="inference.meshserve.svc.cluster.local", keys=["resnet/3"]
            )
        )
        assert sorted(member.address for member in ring.members) == sorted(m.addresses)
        assert sum(member.share for member in ring.members) == pytest.approx(1.0)
        assert all(member.points == 1024 for member in ring.members)
        assert [member.address for member in ring.members if "resnet/3" in member.keys] == [
            explained.endpoint
        ]

        endpoints = await stub.ListEndpoints(admin_pb2.ListEndpointsRequest(host="inference"))
        (group,) = endpoints.groups
        assert group.host == "inference" and len(group.endpoints) == 3
        assert all(e.healthy and not e.ejected for e in group.endpoints)

        instances = await stub.ListInstances(admin_pb2.ListInstancesRequest(service="data"))
        assert len(instances.instances) == 3
        assert all(i.status == admin_pb2.SERVING_STATUS_SERVING for i in instances.instances)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetRing(admin_pb2.GetRingRequest(host="data"))
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "data balances with ROUND_ROBIN" in (caught.value.details() or "")


async def test_reflection_lists_every_mesh_service_through_the_gateway() -> None:
    async with mesh(1) as m:
        call = m.channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            yield reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            )
            # What grpcurl `describe` does next: fetch each import by its file name,
            # which is the path under protos/ (the -I protos layout).
            yield reflection_pb2.ServerReflectionRequest(
                file_by_filename="inference/model_config.proto"
            )

        responses = [r async for r in call(requests())]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {
            "inference.GRPCInferenceService",
            "meshserve.data.v1.DataService",
            "meshserve.training.v1.TrainingService",
            "meshserve.mesh.v1.Admin",
        } <= names
        service_file = descriptor_pb2.FileDescriptorProto.FromString(
            responses[1].file_descriptor_response.file_descriptor_proto[0]
        )
        assert service_file.name == "inference/grpc_service.proto"
        assert list(service_file.dependency) == ["inference/model_config.proto"]
        imported = descriptor_pb2.FileDescriptorProto.FromString(
            responses[2].file_descriptor_response.file_descriptor_proto[0]
        )
        assert imported.name == "inference/model_config.proto"
        assert "ModelConfig" in {m.name for m in imported.message_type}


MIRROR_AND_HEADERS = (
    """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - headers:
        request: {set: {x-from-gateway: "yes"}}
        response: {set: {x-served-by: meshserve}}
      mirror: {host: inference, subset: shadow}
      route: [{destination: {host: inference, subset: live}}]
"""
    + "---"
    + lane_subsets()
)


async def test_mirror_copies_calls_and_header_edits_apply_both_ways() -> None:
    async with mesh(2, config_dir=None) as m:
        live, shadow = m.workers
        m.discovery.push(
            "reset",
            *(
                StaticInstance("inference", w.name, a, {"lane": lane})
                for w, a, lane in zip(m.workers, m.addresses, ("live", "shadow"), strict=True)
            ),
        )
        await m.wait_endpoints("inference", 2)
        await admin(m.admin_channel).ApplyConfig(
            admin_pb2.ApplyConfigRequest(yaml=MIRROR_AND_HEADERS)
        )
        for _ in range(5):
            call = m.inference.ModelInfer(infer("m", "1"), timeout=5)
            assert (await call).id == "w0"  # the client only ever sees the live answer
            assert dict(await call.initial_metadata())["x-served-by"] == "meshserve"
        assert len(live.seen) == 5 and all(s["x-from-gateway"] == "yes" for s in live.seen)
        deadline = asyncio.get_running_loop().time() + 10
        while len(shadow.seen) < 5:  # mirrored calls are fire-and-forget: poll
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert all(s["x-meshserve-shadow"] == "1" for s in shadow.seen)
        assert {s["x-request-id"] for s in shadow.seen} == {s["x-request-id"] for s in live.seen}


CIRCUIT = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 2}}
"""


async def test_http2_max_requests_sheds_load_beyond_the_limit() -> None:
    async with mesh(1, config_dir=None) as m:
        await admin(m.admin_channel).ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=CIRCUIT))
        hold = asyncio.Event()
        m.workers[0].hold = hold
        held = [
            asyncio.ensure_future(m.inference.ModelInfer(infer("m", str(i)), timeout=10))
            for i in range(2)
        ]
        deadline = asyncio.get_running_loop().time() + 10
        while m.gateway.state.tracker.in_flight(m.addresses[0]) < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.inference.ModelInfer(infer("m", "9"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "http2MaxRequests" in (caught.value.details() or "")
        hold.set()
        assert len(await asyncio.gather(*held)) == 2


async def test_a_changed_config_file_is_picked_up(tmp_path: Path) -> None:
    for name in ("inference.yaml", "gateway.yaml"):  # its rules name the Gateway
        (tmp_path / name).write_text((REPO / "config" / name).read_text())
    async with mesh(1, config_dir=tmp_path) as m:
        version = m.gateway.state.config.version
        (tmp_path / "canary.yaml").write_text(
            CANARY.replace("name: inference", "name: inference-canary", 1).replace(
                "hosts:\n    - inference", "hosts:\n    - inference.meshserve"
            )
        )
        deadline = asyncio.get_running_loop().time() + 10
        while (
            m.gateway.state.last_rejection is None
            or "already routed" not in m.gateway.state.last_rejection.error
        ):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        (tmp_path / "canary.yaml").unlink()
        (tmp_path / "inference.yaml").write_text(
            CANARY + "---\n" + (REPO / "config" / "inference.yaml").read_text().split("---\n", 1)[1]
        )
        while m.gateway.state.config.version == version:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        reply = await m.inference.ModelInfer(infer("demo"), timeout=5)
        assert reply.model_version in ("1", "2")  # the canary now sets the version


@pytest.mark.parametrize(
    ("yaml", "problem"),
    [
        (
            routed_to("nosuchservice"),
            "admin: VirtualService meshserve/inference: spec.http[0].route[0].destination.host: "
            "'nosuchservice' is not a registered service (registered: data, inference)",
        ),
        (
            routed_to("inference/v9"),
            "spec.http[0].route[0].destination.subset: subset 'v9' is not defined",
        ),
        # v1 exists, but no instance carries version=v1: inference would have no route.
        (
            version_subsets("v1") + "---" + routed_to("inference/v1"),
            "spec.http[0].route: host 'inference' is served now (3 registered instances) but "
            "no destination of http[0] reaches one",
        ),
        # The same, with the only route going to a declared host that has no instance.
        (
            routed_to("training"),
            "no destination of http[0] reaches one (training: host 'training' has no "
            "registered instance)",
        ),
    ],
)
async def test_an_apply_that_would_cause_an_outage_is_refused_and_routing_is_unchanged(
    yaml: str, problem: str
) -> None:
    async with mesh() as m:
        stub = admin(m.admin_channel)
        before = await stub.DumpConfig(admin_pb2.DumpConfigRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (refused.value.details() or "")
        # A dry run is refused the same way.
        with pytest.raises(grpc.aio.AioRpcError) as dry:
            await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=yaml, dry_run=True))
        assert dry.value.details() == refused.value.details()
        after = await stub.DumpConfig(admin_pb2.DumpConfigRequest())
        assert after.version == before.version
        assert [r.yaml for r in after.resources] == [r.yaml for r in before.resources]
        replies = [await m.inference.ModelInfer(infer("m", str(i)), timeout=5) for i in range(30)]
        assert {r.id for r in replies} <= {w.name for w in m.workers}


async def test_rollback_restores_the_config_before_the_last_apply() -> None:
    async with mesh(2) as m:
        stub = admin(m.admin_channel)
        with pytest.raises(grpc.aio.AioRpcError) as nothing:
            await stub.RollbackConfig(admin_pb2.RollbackConfigRequest())
        assert nothing.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        base = await stub.DumpConfig(admin_pb2.DumpConfigRequest())
        applied = await stub.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=FAULT))
        dry = await stub.RollbackConfig(admin_pb2.RollbackConfigRequest(dry_run=True))
        assert dry.version == applied.version
        rolled = await stub.RollbackConfig(
            admin_pb2.RollbackConfigRequest(expected_version=applied.version)
        )
        assert rolled.version == applied.version + 1
        assert rolled.restored == f"the config before version {applied.version}"
        dump = await stub.DumpConfig(admin_pb2.DumpConfigRequest())
        assert [r.yaml for r in dump.resources] == [r.yaml for r in base.resources]
        # No fault any more: every call succeeds.
        for i in range(40):
            await m.inference.ModelInfer(infer("m", str(i)), timeout=5)
        # Rolling back again undoes the rollback (as `kubectl rollout undo`).
        again = await stub.RollbackConfig(admin_pb2.RollbackConfigRequest())
        assert again.resources == ["VirtualService/inference"]
        dump = await stub.DumpConfig(admin_pb2.DumpConfigRequest())
        assert any("fault" in r.yaml for r in dump.resources)


@pytest.mark.parametrize("method", ["garbage", "/inference.GRPCInferenceService", "a/b/c", "//"])
async def test_explain_route_refuses_a_malformed_method_naming_the_form(method: str) -> None:
    """``route explain --method garbage`` answered UNIMPLEMENTED, which reads as "no route
    matches"; a well-formed method no service serves keeps that answer."""
    async with mesh(1) as m:
        stub = admin(m.admin_channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExplainRoute(admin_pb2.ExplainRouteRequest(method=method))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (
            f"method: {method!r} is not a gRPC method path (want /package.Service/Method)"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExplainRoute(admin_pb2.ExplainRouteRequest(method="/foo.Bar/Baz"))
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
