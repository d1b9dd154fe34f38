"""RequestAuthentication at the gateway, through the real relay: RS256 (inline JWKS) and
ES256 (JWKS from a local HTTP server, fetched in the background), principals and claims
for AuthorizationPolicy, and the headers the worker receives."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.harness import REPO, infer, mesh
from tests.mesh.security.jwt_support import Issuer, serve_jwks


def policies(rsa: Issuer, ec: Issuer, url: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: edge-users}}
spec:
  selector: {{matchLabels: {{app: gateway}}}}
  jwtRules:
    - issuer: {rsa.iss}
      jwks: '{rsa.jwks()}'
      outputPayloadToHeader: x-jwt-payload
    - issuer: {ec.iss}
      jwksUri: {url}
      audiences: [meshserve]
      forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: infer-needs-a-user}}
spec:
  selector: {{matchLabels: {{app: gateway}}}}
  action: DENY
  rules:
    - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
      to: [{{operation: {{paths: ["/inference.GRPCInferenceService/ModelInfer"]}}}}]
    - when: [{{key: "request.auth.claims[groups]", values: [banned]}}]
"""


async def test_end_user_jwts_at_the_gateway(tmp_path: Path) -> None:
    rsa, ec = Issuer.rsa("https://login.example.com"), Issuer.ec("https://ec.example.com")
    for file in (REPO / "config").glob("*.yaml"):
        shutil.copy(file, tmp_path / file.name)
    with serve_jwks({"jwks": ec.jwks()}) as (url, hits):
        (tmp_path / "users.yaml").write_text(policies(rsa, ec, url))
        async with mesh(1, tmp_path) as m:
            gateway = m.gateway
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while gateway.authn.jwks.keys(url) is None:
                assert loop.time() < deadline, "the JWKS URI was never fetched"
                await asyncio.sleep(0.01)
            assert hits == ["/jwks.json"]
            stub = pb_grpc.GRPCInferenceServiceStub(m.channel)

            async def code(token: str | None) -> grpc.StatusCode:
                md = () if token is None else (("authorization", f"Bearer {token}"),)
                try:
                    await stub.ModelInfer(infer("demo", "1"), metadata=md, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            seen = m.workers[0].seen
            assert await code(rsa.token("alice", groups=["ml"])) is grpc.StatusCode.OK
            # forwardOriginalToken false: the worker never sees the token, but the payload.
            assert "authorization" not in seen[-1]
            payload = seen[-1]["x-jwt-payload"]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            assert claims["sub"] == "alice"
            assert await code(ec.token("bob", aud="meshserve")) is grpc.StatusCode.OK
            assert seen[-1]["authorization"].startswith("Bearer ")  # forwarded as asked
            calls = len(seen)
            # No token: RequestAuthentication lets it by, the DENY on no principal stops it.
            assert await code(None) is grpc.StatusCode.PERMISSION_DENIED
            # Invalid tokens: UNAUTHENTICATED, and the worker never sees them.
            assert await code(ec.token("bob", aud="other")) is grpc.StatusCode.UNAUTHENTICATED
            forged = Issuer.rsa(rsa.iss).token("alice")
            assert await code(forged) is grpc.StatusCode.UNAUTHENTICATED
            banned = rsa.token("eve", groups=["banned"])
            assert await code(banned) is grpc.StatusCode.PERMISSION_DENIED
            assert len(seen) == calls


@pytest.mark.parametrize("header", ["x-jwt-payload"])
async def test_a_forged_payload_header_never_reaches_the_worker(
    tmp_path: Path, header: str
) -> None:
    rsa, ec = Issuer.rsa("https://login.example.com"), Issuer.ec("https://ec.example.com")
    for file in (REPO / "config").glob("*.yaml"):
        shutil.copy(file, tmp_path / file.name)
    # The first document only; split on the separator line, as a JWKS (base64url) may hold
    # "---" itself.
    text = policies(rsa, ec, "http://127.0.0.1:9/jwks.json").split("\n---\n")[0]
    (tmp_path / "users.yaml").write_text(text)
    async with mesh(1, tmp_path) as m:
        stub = pb_grpc.GRPCInferenceServiceStub(m.channel)
        await stub.ModelInfer(infer("demo", "1"), metadata=((header, "e30"),), timeout=10)
        assert header not in m.workers[0].seen[-1]
