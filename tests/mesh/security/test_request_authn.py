"""RequestAuthentication through the pure core: Istio's documented behaviour, a table per
field, the AuthorizationPolicy keys it feeds, and the JWKS cache against a real HTTP server."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator

import pytest

from mesh.config.fields import ConfigError
from mesh.config.snapshot import MeshConfig, config_from_yaml
from mesh.errors import Unauthenticated
from mesh.routing.headers import as_dict
from mesh.security.authz import RequestAttributes, evaluate
from mesh.security.jwks import JwksCache
from mesh.security.request_authn import AuthnOutcome, RequestAuthenticator
from mesh.security.workload import Workload
from tests.mesh.security.jwt_support import Issuer, serve_jwks

RSA = Issuer.rsa("https://login.example.com")
EC = Issuer.ec("https://ec.example.com")
OTHER = Issuer.rsa("https://login.example.com", kid="rsa-1")  # same iss and kid, other key
WORKLOAD = Workload("meshserve", (("app", "inference"),))
INFER = "/inference.GRPCInferenceService/ModelInfer"


def ra(rules: str, *, selector: str = "", name: str = "jwt") -> str:
    return (
        f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: {name}}}\nspec:\n{selector}  jwtRules:\n{rules}"
    )


def rule(issuer: Issuer, extra: str = "") -> str:
    return f"  - issuer: {issuer.iss}\n    jwks: '{issuer.jwks()}'\n{extra}"


def authn(text: str, workload: Workload = WORKLOAD) -> RequestAuthenticator:
    config = config_from_yaml(text, source="ra.yaml")
    return RequestAuthenticator(lambda: config.request_authentications, workload)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


BOTH = ra(rule(RSA) + rule(EC, "    audiences: [inference]\n"))


# -- Istio's three outcomes ------------------------------------------------------------


def test_a_call_without_a_token_passes_with_no_principal() -> None:
    outcome = authn(BOTH)({"x-model-version": "m/1"})
    assert outcome.identity is None


@pytest.mark.parametrize("issuer", [RSA, EC], ids=["RS256", "ES256"])
def test_a_valid_token_yields_iss_slash_sub_and_its_claims(issuer: Issuer) -> None:
    outcome = authn(BOTH)(bearer(issuer.token("bob", aud="inference", groups=["ml"])))
    assert outcome.identity is not None
    assert outcome.identity.principal == f"{issuer.iss}/bob"
    assert outcome.identity.claims["groups"] == ["ml"]
    # forwardOriginalToken false (Istio's default): the token does not go on.
    assert "authorization" in outcome.remove


#: (case, the token made when the test runs, what the refusal says): times are relative to
#: the call, not to the module's import, which in a whole suite comes minutes earlier.
INVALID: list[tuple[str, Callable[[], str], str]] = [
    ("bad signature", lambda: OTHER.token(), "signature does not verify"),
    ("expired", lambda: RSA.token(exp=int(time.time()) - 120), "expired"),
    ("not valid yet", lambda: RSA.token(nbf=int(time.time()) + 120), "not valid yet"),
    ("wrong audience", lambda: EC.token(aud="training"), "audience"),
    (
        "unknown issuer",
        lambda: Issuer.rsa("https://evil.example.com").token(),
        "is not accepted here",
    ),
    ("not a JWT", lambda: "not-a-jwt", "not a JWT"),
    (
        "alg none",
        lambda: "eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL2xvZ2luLmV4YW1wbGUuY29tIn0.",
        "alg",
    ),
]


@pytest.mark.parametrize(
    ("make", "says"), [(t, s) for _, t, s in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_an_invalid_token_is_unauthenticated_naming_why(make: Callable[[], str], says: str) -> None:
    token = make()
    with pytest.raises(Unauthenticated, match=says):
        authn(BOTH)(bearer(token))


def test_two_tokens_in_one_header_name_are_unauthenticated() -> None:
    """Which to verify would be a guess (and the other would still go on to the worker)."""
    token = RSA.token()
    twice = as_dict([("authorization", "Bearer junk"), ("authorization", f"Bearer {token}")])
    with pytest.raises(Unauthenticated, match="more than one 'authorization' header"):
        authn(BOTH)(twice)
    assert authn(BOTH)(as_dict([("authorization", f"Bearer {token}")])).identity is not None


def test_clock_skew_of_a_minute_is_allowed_and_iat_is_not_checked() -> None:
    """Envoy's jwt_authn (what Istio configures, with no knob) allows 60 s of clock skew
    on exp and nbf and does not judge iat: a token fresh from an issuer whose clock ran a
    second ahead was refused here ("not valid yet") until the mesh's clock caught up."""
    now = int(time.time())
    check = authn(BOTH)
    for token in (
        RSA.token(iat=now + 5, nbf=now + 5),
        RSA.token(iat=now + 3600),
        RSA.token(exp=now - 30),
    ):
        outcome = check(bearer(token))
        assert outcome.identity is not None and outcome.identity.subject == "alice"


# -- fields ----------------------------------------------------------------------------


def test_from_headers_reads_only_the_named_header_with_its_prefix() -> None:
    check = authn(ra(rule(RSA, "    fromHeaders: [{name: x-goog-iap-jwt-assertion}]\n")))
    token = RSA.token()
    found = check({"x-goog-iap-jwt-assertion": token})
    assert found.identity is not None and found.identity.subject == "alice"
    # The default header is no longer read: a token there is not looked at.
    assert check(bearer(token)).identity is None
    prefixed = authn(ra(rule(RSA, "    fromHeaders: [{name: x-jwt, prefix: 'Token '}]\n")))
    assert prefixed({"x-jwt": f"Token {token}"}).identity is not None


def test_forward_original_token_keeps_it_and_payload_and_claims_are_output() -> None:
    extra = (
        "    forwardOriginalToken: true\n    outputPayloadToHeader: x-jwt-payload\n"
        "    outputClaimToHeaders: [{header: x-tenant, claim: tenant}]\n"
    )
    token = RSA.token(tenant="acme")
    outcome = authn(ra(rule(RSA, extra)))(bearer(token))
    assert "authorization" not in outcome.remove
    added = dict(outcome.add)
    payload = added["x-jwt-payload"]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert decoded["sub"] == "alice" and added["x-tenant"] == "acme"
    # A caller's own copies are removed even without a token: never forged downstream.
    anonymous = authn(ra(rule(RSA, extra)))({"x-jwt-payload": "forged"})
    assert {"x-jwt-payload", "x-tenant"} <= anonymous.remove and not anonymous.add


def test_selector_chooses_the_workloads() -> None:
    selected = ra(rule(RSA), selector="  selector: {matchLabels: {app: training}}\n")
    assert authn(selected)(bearer("garbage")) == AuthnOutcome()  # no rule here: not checked
    with pytest.raises(Unauthenticated):
        authn(selected, Workload("meshserve", (("app", "training"),)))(bearer("garbage"))


REFUSED = [
    (rule(RSA, "    fromParams: [access_token]\n"), "fromParams"),
    (rule(RSA, "    fromCookies: [session]\n"), "fromCookies"),
    (f"  - issuer: {RSA.iss}\n", "OpenID Connect discovery"),
    ("  - issuer: a\n    jwksUri: ftp://x/jwks\n", "file://, http:// or https://"),
    ("  - issuer: a\n    jwks: '{\"keys\": 3}'\n", "keys"),
    (rule(RSA) + rule(RSA), "has a rule already"),
]


@pytest.mark.parametrize(("rules", "says"), REFUSED, ids=[s for _, s in REFUSED])
def test_unusable_rules_are_refused_at_load_naming_the_field(rules: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        config_from_yaml(ra(rules), source="ra.yaml")
    assert "spec.jwtRules" in str(caught.value)


# -- AuthorizationPolicy on what it yields ---------------------------------------------

POLICY = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ml-only}
spec:
  rules:
    - from: [{source: {requestPrincipals: ["https://login.example.com/*"]}}]
      when:
        - {key: "request.auth.claims[groups]", values: [ml]}
        - {key: "request.auth.claims[org][team]", values: [vision]}
        - {key: request.auth.audiences, values: [inference]}
"""


def test_claims_principals_and_audiences_feed_authorization_policy() -> None:
    config: MeshConfig = config_from_yaml(
        BOTH.replace(rule(EC, "    audiences: [inference]\n"), "") + POLICY, source="p.yaml"
    )
    check = RequestAuthenticator(lambda: config.request_authentications, WORKLOAD)

    def allowed(headers: dict[str, str]) -> bool:
        identity = check(headers).identity
        request = RequestAttributes(
            INFER,
            request_principal=None if identity is None else identity.principal,
            request_claims={} if identity is None else identity.claims,
        )
        return evaluate(config.authorization_policies, WORKLOAD, request).allowed

    team = {"team": "vision"}
    assert allowed(bearer(RSA.token(groups=["ops", "ml"], org=team, aud=["x", "inference"])))
    assert not allowed(bearer(RSA.token(groups=["ops"], org=team, aud="inference")))
    assert not allowed(bearer(RSA.token(groups="ml", org={"team": "nlp"}, aud="inference")))
    assert not allowed({})  # no token: no principal, the ALLOW rule does not match


# -- JWKS from a URI, fetched in the background ----------------------------------------


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, list[str], dict[str, str]]]:
    body = {"jwks": RSA.jwks()}
    with serve_jwks(body) as (url, hits):
        yield url, hits, body


async def test_a_jwks_uri_is_fetched_in_the_background_and_refreshed(
    jwks_server: tuple[str, list[str], dict[str, str]],
) -> None:
    url, hits, body = jwks_server
    config = config_from_yaml(ra(f"  - issuer: {RSA.iss}\n    jwksUri: {url}\n"), source="ra.yaml")
    now = [0.0]
    check = RequestAuthenticator(lambda: config.request_authentications, WORKLOAD)
    check.jwks = JwksCache(check.wanted, clock=lambda: now[0], refresh=60.0)
    token = RSA.token()
    # Before the first fetch: the call never waits on it, the token is refused.
    with pytest.raises(Unauthenticated, match="not been fetched yet"):
        check(bearer(token))
    assert hits == []
    await check.jwks.refresh_due()
    assert hits == ["/jwks.json"]
    assert check(bearer(token)).identity is not None
    # Key rotation at the issuer: picked up on the next refresh, not before.
    rotated = Issuer.rsa(RSA.iss)
    body["jwks"] = rotated.jwks()
    await check.jwks.refresh_due()
    assert len(hits) == 1
    now[0] = 61.0
    await check.jwks.refresh_due()
    assert len(hits) == 2
    assert check(bearer(rotated.token())).identity is not None
    with pytest.raises(Unauthenticated):
        check(bearer(token))


async def test_a_failed_fetch_keeps_the_last_keys(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    keys = folder / "jwks.json"
    keys.write_text(EC.jwks())
    config = config_from_yaml(
        ra(f"  - issuer: {EC.iss}\n    jwksUri: file://{keys}\n"), source="ra.yaml"
    )
    now = [0.0]
    check = RequestAuthenticator(lambda: config.request_authentications, WORKLOAD)
    check.jwks = JwksCache(check.wanted, clock=lambda: now[0], refresh=1.0)
    task = asyncio.get_running_loop().create_task(check.jwks.run(poll=0.01))
    try:
        deadline = time.monotonic() + 10
        while check.jwks.keys(f"file://{keys}") is None:
            assert time.monotonic() < deadline, "the file JWKS was never read"
            await asyncio.sleep(0.01)
        keys.unlink()
        now[0] = 5.0
        while f"file://{keys}" not in check.jwks.errors:
            assert time.monotonic() < deadline, "the failed read was never recorded"
            await asyncio.sleep(0.01)
        assert check(bearer(EC.token())).identity is not None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
