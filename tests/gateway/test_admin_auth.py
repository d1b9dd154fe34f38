"""Admin authorization: the admin scope from API keys and JWTs, and Admin refused by default."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import Gateway
from gateway.auth import ADMIN_LOCKED, AuthConfig, ClientGuard, hash_key, new_key
from mesh.config.fields import ConfigError
from mesh.config.loader import parse_yaml
from mesh.config.security import AuthorizationPolicy
from mesh.config.views import DEFAULT_INGRESS_LABELS
from mesh.errors import MeshError, PermissionDenied, Unauthenticated
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway.harness import ADMIN_METADATA, REPO, admin_guard, serve_workers
from tests.gateway.test_relay import until

DATA_KEY, OPS_KEY = new_key(), new_key()
SECRET = b"s" * 64
DUMP = "/meshserve.mesh.v1.Admin/DumpConfig"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def load(tmp_path: Path, text: str) -> AuthConfig:
    (tmp_path / "jwt.secret").write_bytes(SECRET)
    path = tmp_path / "auth.yaml"
    path.write_text(text)
    return AuthConfig.load(path)


@pytest.fixture
def guard(tmp_path: Path) -> ClientGuard:
    return ClientGuard(
        load(
            tmp_path,
            f"""
apiKeys:
  - {{client: analytics, sha256: "{hash_key(DATA_KEY)}"}}
  - {{client: ops, sha256: "{hash_key(OPS_KEY)}", scopes: [admin]}}
jwt:
  keys: [{{algorithm: HS256, secretFile: jwt.secret}}]
""",
        )
    )


def token(**claims: Any) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 600, **claims}
    return "Bearer " + jwt.encode(body, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ({"x-api-key": OPS_KEY}, "ops"),
        ({"authorization": f"Bearer {OPS_KEY}"}, "ops"),
        ({"authorization": token(scope="read admin")}, "alice"),
        ({"authorization": token(scp=["admin"])}, "alice"),
        ({"authorization": token(scp="admin")}, "alice"),
    ],
)
def test_the_admin_scope_admits_admin_calls(
    guard: ClientGuard, headers: dict[str, str], client: str
) -> None:
    admitted, _ = guard.admit(DUMP, headers)
    assert admitted is not None and admitted.name == client


@pytest.mark.parametrize(
    ("headers", "error", "problem"),
    [
        ({}, Unauthenticated, "missing credentials"),
        ({"x-api-key": "msk_wrong"}, Unauthenticated, "not valid"),
        ({"x-api-key": DATA_KEY}, PermissionDenied, "client 'analytics' (api-key) lacks"),
        ({"authorization": token(scope="read")}, PermissionDenied, "client 'alice' (jwt) lacks"),
        ({"authorization": token()}, PermissionDenied, "'admin' scope"),
    ],
)
def test_admin_calls_without_the_scope_are_refused(
    guard: ClientGuard, headers: dict[str, str], error: type[MeshError], problem: str
) -> None:
    with pytest.raises(error) as refused:
        guard.check(DUMP, headers)
    assert problem in refused.value.message
    # The data plane takes the same data-plane key.
    if headers.get("x-api-key") == DATA_KEY:
        guard.check(INFER, headers)


def test_admin_is_never_exempt(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f'apiKeys: [{{client: a, sha256: "{hash_key(DATA_KEY)}"}}]\nexemptMethods: ["/*"]\n',
    )
    guard = ClientGuard(config)
    guard.check(INFER, {})
    with pytest.raises(PermissionDenied, match="no admin credential configured"):
        guard.check(DUMP, {"x-api-key": DATA_KEY})


def test_without_an_admin_credential_admin_is_refused_saying_how_to_grant_one() -> None:
    guard = ClientGuard(ADMIN_LOCKED)
    guard.check(INFER, {})  # the data plane stays open
    guard.check(INFER, {"x-api-key": "anything"})  # nothing to check a key against
    with pytest.raises(PermissionDenied) as refused:
        guard.check(DUMP, {"x-api-key": OPS_KEY})
    assert "--auth-config" in refused.value.message and "scopes: [admin]" in refused.value.message


def test_an_open_data_plane_admits_calls_without_credentials_but_checks_sent_ones(
    tmp_path: Path,
) -> None:
    config = load(
        tmp_path,
        f'apiKeys: [{{client: ops, sha256: "{hash_key(OPS_KEY)}", scopes: [admin]}}]\n'
        "dataPlane: open\n",
    )
    guard = ClientGuard(config)
    assert guard.admit(INFER, {}) == (None, 0.0)
    with pytest.raises(Unauthenticated):
        guard.check(INFER, {"x-api-key": "msk_wrong"})
    with pytest.raises(Unauthenticated):
        guard.check(DUMP, {})
    guard.check(DUMP, {"x-api-key": OPS_KEY})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("dataPlane: closed", "dataPlane: must be one of authenticated, open"),
        (f"apiKeys: [{{client: a, sha256: '{'a' * 64}', scopes: admin}}]", "scopes"),
        (f"apiKeys: [{{client: a, sha256: '{'a' * 64}', roles: [admin]}}]", "unknown field"),
    ],
)
def test_scope_config_errors_name_the_field(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load(tmp_path, text)


async def test_admin_through_the_public_port_needs_the_admin_key() -> None:
    """Data-plane key: PERMISSION_DENIED; none: UNAUTHENTICATED; the admin key: served."""
    data_key = new_key()
    gateway = Gateway(
        StaticDiscovery(),
        config_dir=REPO / "config",
        guard=admin_guard(data_plane_keys={"analytics": data_key}),
    )
    serving = await gateway.start(ServerSettings())
    try:
        assert gateway.relay is not None
        async with grpc.aio.insecure_channel(serving.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            request = admin_pb2.DumpConfigRequest()
            for metadata, code in [
                ((), grpc.StatusCode.UNAUTHENTICATED),
                ((("x-api-key", data_key),), grpc.StatusCode.PERMISSION_DENIED),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await admin.DumpConfig(request, metadata=metadata, timeout=10)
                assert refused.value.code() is code
            dump = await admin.DumpConfig(request, metadata=ADMIN_METADATA, timeout=10)
            assert dump.version == gateway.state.config.version
        if gateway.relay is not None:
            # The gRPC server behind the relay checks Admin's scope too (defence in depth:
            # its socket is private, but the check must hold on every path).
            internal = gateway.relay.internal_address
            assert internal is not None  # the gateway's relay has its gRPC server behind it
            async with grpc.aio.insecure_channel(internal) as channel:
                admin = admin_pb2_grpc.AdminStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await admin.DumpConfig(request, metadata=(("x-api-key", data_key),), timeout=10)
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
                await admin.DumpConfig(request, metadata=ADMIN_METADATA, timeout=10)
    finally:
        await serving.drain(grace=0)


async def test_a_gateway_without_auth_config_refuses_admin_and_serves_the_rest() -> None:
    gateway = Gateway(StaticDiscovery(), config_dir=REPO / "config")
    serving = await gateway.start(ServerSettings())
    try:
        async with grpc.aio.insecure_channel(serving.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.ApplyConfig(
                    admin_pb2.ApplyConfigRequest(yaml=""), metadata=ADMIN_METADATA, timeout=10
                )
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "no admin credential configured" in (refused.value.details() or "")
            # Health stays open (the gateway's own non-Admin services are not locked).
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await serving.drain(grace=0)


def test_authorization_policies_apply_to_calls_without_credentials_on_an_open_data_plane(
    tmp_path: Path,
) -> None:
    policies = [
        d.resource
        for d in parse_yaml(
            """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-metadata-calls}
spec:
  selector: {matchLabels: {app: gateway}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/inference.GRPCInferenceService/ModelMetadata"]}}]}]
""",
            "edge.yaml",
        )
        if isinstance(d.resource, AuthorizationPolicy)
    ]
    guard = admin_guard()
    guard.policies = lambda: policies
    guard.check(INFER, {})
    with pytest.raises(PermissionDenied, match="anonymous call: RBAC: access denied"):
        guard.check("/inference.GRPCInferenceService/ModelMetadata", {})


EDGE_DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-infer-at-the-edge}
spec:
  selector: {matchLabels: {app: APP}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/inference.GRPCInferenceService/ModelInfer"]}}]}]
"""


@pytest.mark.parametrize(
    ("app", "selected", "denied"),
    [
        # The default labels (app=gateway): a policy selecting them applies; none, none does.
        (None, "gateway", True),
        (None, None, False),
        # --labels app=edge: policies select the gateway by the labels it was given, the
        # same a Gateway's selector matches, and one for app=gateway is another workload's.
        ("edge", "gateway", False),
        ("edge", "edge", True),
    ],
)
async def test_a_gateway_without_auth_config_evaluates_authorization_policy(
    tmp_path: Path, app: str | None, selected: str | None, denied: bool
) -> None:
    """Istio evaluates the policies selecting its ingress whatever else is configured: a
    gateway started without --auth-config (no guard given) refuses what a DENY policy in
    its config folder names, and routes it when there is none."""
    for file in (REPO / "config").glob("*.yaml"):
        text = file.read_text()
        if app is not None:
            text = text.replace("app: gateway", f"app: {app}")  # the shipped Gateway's selector
        (tmp_path / file.name).write_text(text)
    if selected is not None:
        (tmp_path / "edge.yaml").write_text(EDGE_DENY.replace("APP", selected))
    async with AsyncExitStack() as stack:
        workers, addresses = await serve_workers(stack, 1)
        gateway = Gateway(
            StaticDiscovery([StaticInstance("inference", "w0", addresses[0])]),
            config_dir=tmp_path,
            labels=DEFAULT_INGRESS_LABELS if app is None else [("app", app)],
        )
        serving = await gateway.start(ServerSettings())
        stack.push_async_callback(serving.drain, 0)
        await until(lambda: len(gateway.state.snapshot.endpoints("inference")) == 1)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(serving.address))
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="m")
        if denied:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(request, timeout=10)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "no-infer-at-the-edge" in (refused.value.details() or "")
            assert workers[0].seen == []
            # The policy names one method: the rest of the data plane is routed.
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
        else:
            reply = await stub.ModelInfer(request, timeout=10)
            assert reply.id == "w0"
