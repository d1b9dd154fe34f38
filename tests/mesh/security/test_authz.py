"""AuthorizationPolicy: Istio's evaluation order, matching rules, and the enforcing interceptor."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from mesh.config.loader import parse_yaml
from mesh.config.security import AuthorizationPolicy
from mesh.security.authz import Authorizer, RequestAttributes, _peer_ip, evaluate, match_value
from mesh.security.ca import CertificateAuthority
from mesh.security.guard import GuardInterceptor
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import CertificateSource
from mesh.security.workload import Workload
from tests.mesh.security.tls_support import call_who, tls_server

INFER = "/inference.GRPCInferenceService/ModelInfer"
READY = "/inference.GRPCInferenceService/ModelReady"
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
GATEWAY = "cluster.local/ns/meshserve/sa/gateway"
TRAINING = "cluster.local/ns/ml/sa/training"
WORKLOAD = Workload("meshserve", (("app", "inference"),))


def policies(text: str) -> tuple[AuthorizationPolicy, ...]:
    found = []
    for doc in parse_yaml(text, "test.yaml"):
        assert isinstance(doc.resource, AuthorizationPolicy)
        found.append(doc.resource)
    return tuple(found)


DENY_LOAD = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-repository-writes}
spec:
  selector: {matchLabels: {app: inference}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/inference.GRPCInferenceService/Server*"]}}]
  - from: [{source: {notPrincipals: ["cluster.local/ns/meshserve/sa/*"]}}]
    to: [{operation: {paths: ["*/RepositoryModelLoad", "*/RepositoryModelUnload"]}}]
"""
)
ALLOW_GATEWAY = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gateway-only}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/meshserve/sa/gateway"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/inference.GRPCInferenceService/*"]}}]
  - from: [{source: {namespaces: ["ml"]}}]
    to: [{operation: {paths: ["*/ModelReady"], notPaths: ["/grpc.health*"]}}]
    when: [{key: "request.headers[x-team]", values: ["research"]}]
"""
)
ALLOW_NOTHING = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing}
spec: {}
"""
)
OTHER_WORKLOAD = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: training-only, namespace: meshserve}
spec:
  selector: {matchLabels: {app: training}}
  action: DENY
  rules: [{}]
"""
)


def req(path: str, principal: str | None = None, **headers: str) -> RequestAttributes:
    ns = None if principal is None else principal.split("/")[2]
    return RequestAttributes(path, principal, ns, headers=headers)


@pytest.mark.parametrize(
    ("pattern", "value", "matched"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/bc", False),
        ("a/*", "a/bc", True),
        ("*/bc", "a/bc", True),
        ("*", "x", True),
        ("*", "", False),
        ("*", None, False),
        ("a*", None, False),
    ],
)
def test_istio_string_matching(pattern: str, value: str | None, matched: bool) -> None:
    assert match_value(pattern, value) is matched


@pytest.mark.parametrize(
    ("policy_set", "attrs", "allowed", "reason"),
    [
        ((), req(INFER), True, "no ALLOW policy applies"),
        (DENY_LOAD, req(INFER, GATEWAY), True, "no ALLOW policy applies"),
        (
            DENY_LOAD,
            req("/inference.GRPCInferenceService/ServerLive", GATEWAY),
            False,
            "AuthorizationPolicy/no-repository-writes (meshserve, test.yaml) rule 0",
        ),
        (DENY_LOAD, req(LOAD, GATEWAY), True, "no ALLOW"),
        (
            DENY_LOAD,
            req(LOAD, TRAINING),
            False,
            "no-repository-writes (meshserve, test.yaml) rule 1",
        ),
        # No mTLS, no principal: notPrincipals matches, so the DENY applies.
        (DENY_LOAD, req(LOAD), False, "rule 1"),
        (
            ALLOW_GATEWAY,
            req(INFER, GATEWAY),
            True,
            "allowed by AuthorizationPolicy/gateway-only rule 0",
        ),
        (ALLOW_GATEWAY, req(INFER, TRAINING), False, "no rule of AuthorizationPolicy/gateway-only"),
        (ALLOW_GATEWAY, req(INFER), False, "no rule of"),
        (ALLOW_GATEWAY, req(READY, TRAINING, **{"x-team": "research"}), True, "rule 1"),
        (ALLOW_GATEWAY, req(READY, TRAINING, **{"x-team": "ops"}), False, "no rule of"),
        (ALLOW_GATEWAY, req(READY, TRAINING), False, "no rule of"),
        # DENY is evaluated before ALLOW, whatever the ALLOW says.
        (
            DENY_LOAD + ALLOW_GATEWAY,
            req("/inference.GRPCInferenceService/ServerReady", GATEWAY),
            False,
            "no-repository-writes",
        ),
        (ALLOW_NOTHING, req(INFER, GATEWAY), False, "allow-nothing"),
        (ALLOW_NOTHING + ALLOW_GATEWAY, req(INFER, GATEWAY), True, "gateway-only rule 0"),
        (OTHER_WORKLOAD, req(INFER), True, "no ALLOW policy applies"),
    ],
)
def test_evaluation(
    policy_set: tuple[AuthorizationPolicy, ...],
    attrs: RequestAttributes,
    allowed: bool,
    reason: str,
) -> None:
    decision = evaluate(policy_set, WORKLOAD, attrs)
    assert decision.allowed is allowed
    assert reason in decision.reason


def test_policies_in_another_namespace_do_not_apply() -> None:
    elsewhere = Workload("other", (("app", "inference"),))
    assert evaluate(
        DENY_LOAD, elsewhere, req(LOAD, TRAINING), root_namespace="istio-system"
    ).allowed
    # ... unless they live in the root namespace (by default meshserve's), where they are
    # mesh-wide.
    assert not evaluate(DENY_LOAD, elsewhere, req(LOAD, TRAINING)).allowed


def test_peer_address_parsing() -> None:
    assert _peer_ip("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert _peer_ip("ipv6:[::1]:5000") == "::1"
    assert _peer_ip("unix:/tmp/s") is None


DENY_WHO = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-training}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/ml/sa/training"]}}]
    to: [{operation: {paths: ["/meshtest.Who/*"]}}]
"""
)


async def test_deny_policy_returns_permission_denied_naming_the_rule() -> None:
    td = "cluster.local"
    ca = CertificateAuthority.create(td)
    server = CertificateSource(ca, WorkloadIdentity(td, "meshserve", "inference"))
    gateway = CertificateSource(ca, WorkloadIdentity(td, "meshserve", "gateway"))
    training = CertificateSource(ca, WorkloadIdentity(td, "ml", "training"))
    authorizer = Authorizer(lambda: DENY_WHO, WORKLOAD)
    async with tls_server(server.server_credentials(), [GuardInterceptor(authorizer)]) as serving:
        target = f"localhost:{serving.port}"
        async with grpc.aio.secure_channel(target, gateway.channel_credentials()) as ok:
            assert await call_who(ok) == f"spiffe://{GATEWAY}"
        async with grpc.aio.secure_channel(target, training.channel_credentials()) as denied:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call_who(denied)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "AuthorizationPolicy/no-training" in (refused.value.details() or "")
    assert "rule 0" in (refused.value.details() or "")


JWT_RULES = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-bob}
spec:
  action: DENY
  rules: [{from: [{source: {requestPrincipals: ["https://login.example.com//bob"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-issuer}
spec:
  action: ALLOW
  rules: [{from: [{source: {requestPrincipals: ["https://login.example.com//*"]}}]}]
"""
)


def test_request_principals_are_those_of_a_verified_jwt_and_absent_without_one() -> None:
    # Istio: a call without a JWT has no request principal, so it matches no
    # requestPrincipals (a DENY on bob does not deny it; an ALLOW on the issuer does not
    # allow it). The principal only ever comes from a JWT this process verified
    # (RequestAuthentication), never from metadata a client could forge.
    anonymous = req(INFER, GATEWAY)
    decision = evaluate(JWT_RULES, WORKLOAD, anonymous)
    assert not decision.allowed and "no rule of" in decision.reason
    assert evaluate(JWT_RULES[:1], WORKLOAD, anonymous).allowed
    forged = RequestAttributes(
        INFER, headers={"x-meshserve-request-principal": "https://login.example.com//alice"}
    )
    assert not evaluate(JWT_RULES, WORKLOAD, forged).allowed
    alice = RequestAttributes(INFER, request_principal="https://login.example.com//alice")
    bob = RequestAttributes(INFER, request_principal="https://login.example.com//bob")
    assert evaluate(JWT_RULES, WORKLOAD, alice).allowed
    assert "deny-bob" in evaluate(JWT_RULES, WORKLOAD, bob).reason


DENY_ADMIN_HEADER = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admins}
spec:
  action: DENY
  rules: [{when: [{key: "request.headers[x-user]", values: ["admin*"]}]}]
"""
)


@pytest.mark.parametrize(
    "sent", [(("x-user", "admin"),), (("x-user", "admin"), ("x-user", "bob"))], ids=str
)
async def test_a_repeated_header_cannot_dodge_a_deny_on_it(
    sent: tuple[tuple[str, str], ...],
) -> None:
    # The server's handler sees every value; the policy must too (Envoy joins them with
    # ","), or the header repeated after the denied value slips past the DENY.
    td = "cluster.local"
    ca = CertificateAuthority.create(td)
    server = CertificateSource(ca, WorkloadIdentity(td, "meshserve", "inference"))
    gateway = CertificateSource(ca, WorkloadIdentity(td, "meshserve", "gateway"))
    authorizer = Authorizer(lambda: DENY_ADMIN_HEADER, WORKLOAD)
    async with tls_server(server.server_credentials(), [GuardInterceptor(authorizer)]) as serving:
        target = f"localhost:{serving.port}"
        async with grpc.aio.secure_channel(target, gateway.channel_credentials()) as channel:
            assert await call_who(channel) == f"spiffe://{GATEWAY}"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call_who(channel, metadata=sent)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "AuthorizationPolicy/no-admins" in (refused.value.details() or "")


DENY_UNLESS_TRUSTED = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: trusted-only}
spec:
  action: DENY
  rules: [{when: [{key: "request.headers[x-user]", notValues: ["trusted"]}]}]
"""
)
ALLOW_TRUSTED = policies(
    """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: trusted}
spec:
  action: ALLOW
  rules: [{when: [{key: "request.headers[x-user]", values: ["trusted"]}]}]
"""
)


@pytest.mark.parametrize(
    ("rules", "sent", "allowed"),
    [
        # A DENY meets every element of a repeated (joined) header, in either order...
        (DENY_ADMIN_HEADER, "admin,bob", False),
        (DENY_ADMIN_HEADER, "bob,admin", False),
        (DENY_ADMIN_HEADER, "bob, administrator", False),
        (DENY_ADMIN_HEADER, "bob", True),
        # ...its notValues the whole value: "trusted" beside another is not "trusted".
        (DENY_UNLESS_TRUSTED, "trusted", True),
        (DENY_UNLESS_TRUSTED, "trusted,evil", False),
        (DENY_UNLESS_TRUSTED, "evil,trusted", False),
        # ALLOW matches the whole value, as Envoy does.
        (ALLOW_TRUSTED, "trusted", True),
        (ALLOW_TRUSTED, "trusted,evil", False),
    ],
)
def test_repeated_header_values_favour_the_deny(
    rules: tuple[AuthorizationPolicy, ...], sent: str, allowed: bool
) -> None:
    request = RequestAttributes(path=INFER, headers={"x-user": sent})
    assert evaluate(rules, WORKLOAD, request).allowed is allowed
