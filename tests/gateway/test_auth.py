"""Gateway client authentication and rate limits, through a real grpc.aio server."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth import (
    RETRY_PUSHBACK_TRAILER,
    AuthConfig,
    Authenticator,
    ClientGuard,
    hash_key,
    new_key,
)
from mesh.config.fields import ConfigError
from mesh.errors import Unauthenticated
from mesh.security.guard import GuardInterceptor
from mesh.server.app import ServerSettings, Service, start_server

SECRET = b"s" * 64
KEY = new_key()
ISSUER = "https://login.example.com/"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "jwt.secret").write_bytes(SECRET)
    (tmp_path / "rsa.pem").write_bytes(pem_public(RSA_KEY))
    (tmp_path / "ec.pem").write_bytes(pem_public(EC_KEY))
    path = tmp_path / "auth.yaml"
    path.write_text(
        f"""
apiKeys:
  - {{client: analytics, sha256: "{hash_key(KEY)}"}}
jwt:
  issuer: {ISSUER}
  audiences: [meshserve]
  keys:
    - {{algorithm: HS256, secretFile: jwt.secret}}
    - {{algorithm: RS256, publicKeyFile: rsa.pem}}
    - {{algorithm: ES256, publicKeyFile: ec.pem}}
rateLimit: {{requestsPerSecond: 1, burst: 2}}
clients:
  batch: {{rateLimit: {{requestsPerSecond: 1000}}}}
"""
    )
    return path


def token(key: Any = SECRET, alg: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "meshserve", "sub": "alice", "exp": now + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg)


def hs256_by_hand(secret: bytes) -> str:
    """An HS256 token PyJWT would refuse to make (its key is a PEM public key)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(
        json.dumps(
            {"iss": ISSUER, "aud": "meshserve", "sub": "mallory", "exp": int(time.time()) + 600}
        ).encode()
    )
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ({"x-api-key": KEY}, "analytics"),
        (bearer(KEY), "analytics"),
        (bearer(token()), "alice"),
        (bearer(token(RSA_KEY, "RS256", sub="bob")), "bob"),
        (bearer(token(EC_KEY, "ES256", sub="carol")), "carol"),
    ],
)
def test_accepted_credentials(config_file: Path, headers: dict[str, str], client: str) -> None:
    assert Authenticator(AuthConfig.load(config_file)).authenticate(headers).name == client


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({}, "missing credentials"),
        ({"x-api-key": "msk_wrong"}, "API key is not valid"),
        ({"authorization": "Basic abc"}, "must read 'Bearer"),
        (bearer(token(exp=int(time.time()) - 60)), "JWT has expired"),
        (bearer(token(nbf=int(time.time()) + 600)), "not valid yet"),
        (bearer(token(aud="other")), "audience is not accepted"),
        (bearer(token(iss="https://evil.example/")), "issuer is not accepted"),
        (bearer(token(b"x" * 64)), "signature does not verify"),
        (bearer(token(exp=None)), "required claim 'exp'"),
        (bearer(token(sub=None)), "client claim 'sub'"),
        (bearer(token(alg="HS512")), "algorithm 'HS512' is not accepted"),
        (bearer("a.b.c"), "JWT is malformed"),
        # Algorithm confusion: the RSA public key used as an HMAC secret must not verify.
        (bearer(hs256_by_hand(pem_public(RSA_KEY))), "signature does not verify"),
    ],
)
def test_refused_credentials(config_file: Path, headers: dict[str, str], problem: str) -> None:
    with pytest.raises(Unauthenticated, match=problem):
        Authenticator(AuthConfig.load(config_file)).authenticate(headers)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{}", "configures no credentials"),
        ("apiKeys: [{client: a, sha256: xyz}]", r"apiKeys\[0\]\.sha256: must be 64 hex digits"),
        ("jwt: {keys: [{algorithm: HS256, secretFile: missing}]}", "cannot read"),
        ("jwt: {keys: [{algorithm: RS256, secretFile: s}]}", "needs publicKeyFile"),
        ("jwt: {keys: [{algorithm: none, secretFile: s}]}", "must be one of"),
        (
            f"apiKeys: [{{client: a, sha256: '{'a' * 64}'}}]\nrateLimit: {{requestsPerSecond: 0}}",
            "rateLimit.requestsPerSecond: must be a number",
        ),
        ("apiKey: []", "unknown field"),
        # A date-like value is text, as Kubernetes reads YAML (PyYAML raised ValueError).
        ("apiKeys: [{client: 2000-13-01, sha256: xyz}]", r"apiKeys\[0\]\.sha256"),
        ("apiKeys: [{client: a", "line 1, column 21: not valid YAML"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        AuthConfig.load(path)


def test_the_auth_file_of_docs_security_md_loads_as_written(tmp_path: Path) -> None:
    """The sample a user copies: only its elided digests and the key files it names are
    filled in, so a field the loader renamed or stopped taking fails here."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    (sample,) = re.findall(r"```yaml\n(apiKeys:.*?)```", page, flags=re.S)
    digests = iter([hash_key(KEY), hash_key("the ops key")])
    text = re.sub(r'"[0-9a-f]{4}\.\.\."', lambda _: f'"{next(digests)}"', sample)
    (tmp_path / "jwt.secret").write_bytes(SECRET)
    (tmp_path / "issuer-rsa.pem").write_bytes(pem_public(RSA_KEY))
    (tmp_path / "issuer-ec.pem").write_bytes(pem_public(EC_KEY))
    (tmp_path / "auth.yaml").write_text(text)
    config = AuthConfig.load(tmp_path / "auth.yaml")
    assert sorted(config.api_keys.values()) == ["analytics", "ops"]
    assert config.key_scopes == {hash_key("the ops key"): frozenset({"admin"})}
    assert config.jwt is not None and len(config.jwt.keys) == 3
    assert config.client_limits["analytics"].rate == 5.0


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


@pytest.fixture
async def guarded(config_file: Path) -> AsyncIterator[tuple[grpc.aio.Channel, Clock]]:
    clock = Clock()
    handler = grpc.method_handlers_generic_handler(
        "meshtest.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    guard = ClientGuard(AuthConfig.load(config_file), clock=clock)
    serving = await start_server(
        ServerSettings(),
        [Service("meshtest.Echo", lambda s: s.add_generic_rpc_handlers([handler]))],
        interceptors=[GuardInterceptor(guard)],
    )
    channel = grpc.aio.insecure_channel(serving.address)
    try:
        yield channel, clock
    finally:
        await channel.close()
        await serving.drain(grace=0)


async def _call(
    channel: grpc.aio.Channel, metadata: dict[str, str]
) -> grpc.aio.UnaryUnaryCall[bytes, bytes]:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/meshtest.Echo/Echo"
    )
    return method(b"hi", metadata=tuple(metadata.items()), timeout=10)


async def test_missing_and_bad_keys_are_unauthenticated_over_grpc(
    guarded: tuple[grpc.aio.Channel, Clock],
) -> None:
    channel, _ = guarded
    assert await (await _call(channel, {"x-api-key": KEY})) == b"hi"
    for metadata, problem in [({}, "missing credentials"), ({"x-api-key": "nope"}, "not valid")]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await (await _call(channel, metadata))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert problem in (refused.value.details() or "")
    expired = token(exp=int((dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).timestamp()))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await (await _call(channel, bearer(expired)))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (refused.value.details() or "")


async def test_rate_limit_answers_resource_exhausted_with_pushback(
    guarded: tuple[grpc.aio.Channel, Clock],
) -> None:
    channel, clock = guarded
    for _ in range(2):  # the burst
        assert await (await _call(channel, {"x-api-key": KEY})) == b"hi"
    call = await _call(channel, {"x-api-key": KEY})
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await call
    assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit of 1 requests/s (burst 2) exceeded by client 'analytics'" in (
        limited.value.details() or ""
    )
    trailers = dict(limited.value.trailing_metadata() or ())
    assert trailers[RETRY_PUSHBACK_TRAILER] == "1000"
    # Another client has its own bucket; after the pushback the first passes again.
    assert await (await _call(channel, bearer(token()))) == b"hi"
    clock.now += 1.0
    assert await (await _call(channel, {"x-api-key": KEY})) == b"hi"


def test_gateway_authorizes_jwt_request_principals_before_rate_limiting(config_file: Path) -> None:
    from mesh.config.loader import parse_yaml
    from mesh.config.security import AuthorizationPolicy
    from mesh.errors import PermissionDenied

    policies = [
        d.resource
        for d in parse_yaml(
            f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-bob}}
spec:
  selector: {{matchLabels: {{app: gateway}}}}
  action: DENY
  rules: [{{from: [{{source: {{requestPrincipals: ["{ISSUER}/bob"]}}}}]}}]
""",
            "edge.yaml",
        )
        if isinstance(d.resource, AuthorizationPolicy)
    ]
    guard = ClientGuard(AuthConfig.load(config_file), clock=Clock(), policies=lambda: policies)
    path = "/inference.GRPCInferenceService/ModelInfer"
    client, wait = guard.admit(path, bearer(token(sub="alice")))
    assert client is not None and client.request_principal == f"{ISSUER}/alice" and wait == 0
    with pytest.raises(PermissionDenied, match="client 'bob': RBAC: access denied by"):
        guard.admit(path, bearer(token(sub="bob")))
    # Denied calls spent no token: bob's bucket (burst 2) is still full.
    assert guard.limiter.take("bob") == 0.0
    # API-key clients carry no request principal: the DENY on bob does not touch them.
    assert guard.admit(path, {"x-api-key": KEY})[0] is not None


async def test_two_api_keys_are_refused_by_the_interceptor_too(
    guarded: tuple[grpc.aio.Channel, Clock],
) -> None:
    channel, _ = guarded
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/meshtest.Echo/Echo"
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await method(b"hi", metadata=(("x-api-key", "nope"), ("x-api-key", KEY)), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "more than one 'x-api-key' header" in (refused.value.details() or "")
