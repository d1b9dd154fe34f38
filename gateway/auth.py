"""Gateway client authentication (API keys, JWT) and per-client rate limits, as one interceptor.

Configured by a small YAML file (``meshserve gateway --auth-config FILE``)::

    apiKeys:                      # keys are stored hashed: `meshserve auth new-key` prints both
      - client: analytics
        sha256: 3f0a...           # hex SHA-256 of the key
      - client: ops
        sha256: 9b1c...
        scopes: [admin]           # may call the Admin API (meshserve apply, config, route)
    jwt:
      issuer: https://login.example.com/   # optional; checked when set
      audiences: [meshserve]               # optional; checked when set
      clientClaim: sub                     # the claim that names the client (default sub)
      leeway: 30s                          # clock skew allowed on exp/nbf (default 0s)
      keys:
        - {algorithm: HS256, secretFile: jwt.secret}
        - {algorithm: RS256, publicKeyFile: issuer-rsa.pem, kid: "2024-01"}
        - {algorithm: ES256, publicKeyFile: issuer-ec.pem}
    rateLimit: {requestsPerSecond: 100, burst: 200}     # per client; absent: unlimited
    clients:
      analytics: {rateLimit: {requestsPerSecond: 5, burst: 10}}
    exemptMethods: ["/grpc.health.v1.Health/*"]         # the default
    dataPlane: authenticated      # or open: calls without credentials pass (Admin never does)

Clients send ``x-api-key: <key>`` or ``authorization: Bearer <key or JWT>``, once. Failures are
UNAUTHENTICATED naming what was wrong; a client over its rate gets RESOURCE_EXHAUSTED with
the ``grpc-retry-pushback-ms`` trailer (gRFC A6) saying when to retry.

The Admin API (``/meshserve.mesh.v1.Admin/*``) needs the ``admin`` scope: an API key listed
with ``scopes: [admin]``, or a JWT whose ``scope`` (space-separated, OAuth 2.0) or ``scp``
claim holds it. A known client without it gets PERMISSION_DENIED; no credential,
UNAUTHENTICATED. A gateway with no admin credential configured refuses Admin to everyone
(secure by default; :data:`ADMIN_LOCKED` is its guard when it has no auth file at all).
With ``dataPlane: open``, a call that carries no credential is admitted unauthenticated
(a credential that is sent is still checked, as Istio's RequestAuthentication does): what
``meshserve up`` runs, an admin key and an open data plane.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from gateway.ratelimit import Clock, RateLimit, RateLimiter
from mesh.config.fields import Node, Where
from mesh.config.loader import load_yaml
from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.config.security import AuthorizationPolicy
from mesh.config.views import DEFAULT_INGRESS_LABELS
from mesh.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from mesh.routing import headers as md
from mesh.security.authz import RequestAttributes, evaluate, match_value
from mesh.security.guard import Context
from mesh.security.jwt_verify import JwtCheck, JwtKey, verify
from mesh.security.request_authn import JwtIdentity
from mesh.security.workload import Workload, applies_to

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
CREDENTIAL_HEADERS = (API_KEY_HEADER, AUTHORIZATION_HEADER)
#: gRFC A6: the server's pushback, in milliseconds, as a trailer.
RETRY_PUSHBACK_TRAILER = md.RETRY_PUSHBACK
#: The algorithms an edge key may be configured with (one per key).
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
DEFAULT_EXEMPT = ("/grpc.health.v1.Health/*",)
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: The scope an identity needs for the Admin API, and the methods it guards.
ADMIN_SCOPE = "admin"
ADMIN_METHODS = "/meshserve.mesh.v1.Admin/"
DATA_PLANE_MODES = ("authenticated", "open")
HOW_TO_GRANT_ADMIN = (
    "start the gateway with --auth-config FILE listing an API key with `scopes: [admin]` "
    "(`meshserve auth new-key --client ops --scope admin` prints the entry; `meshserve up` "
    "makes one in <state>/admin.key), or a JWT issuer whose tokens carry scope 'admin'"
)


def hash_key(key: str) -> str:
    """The at-rest form of an API key.

    Keys are 256-bit random strings (see :func:`new_key`), so a fast hash is enough: there
    is nothing to brute-force, unlike passwords.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "msk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class JwtSettings:
    keys: tuple[JwtKey, ...]
    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    client_claim: str = "sub"
    leeway_seconds: float = 0.0

    @property
    def verification(self) -> JwtCheck:
        # The edge credential must expire: a leaked token is not valid forever.
        return JwtCheck(self.issuer, self.audiences, self.leeway_seconds, require=("exp",))


@dataclass(frozen=True)
class AuthConfig:
    """The validated auth file."""

    #: SHA-256 hex digest → client name.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    #: SHA-256 hex digest → the scopes of that key (absent: none).
    key_scopes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    jwt: JwtSettings | None = None
    rate_limit: RateLimit | None = None
    client_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    exempt_methods: tuple[str, ...] = DEFAULT_EXEMPT
    #: Whether a call without credentials is admitted (never for Admin methods).
    open_data_plane: bool = False

    @property
    def admin_possible(self) -> bool:
        """Whether any credential could carry the admin scope (a key with it, or a JWT)."""
        return self.jwt is not None or any(ADMIN_SCOPE in s for s in self.key_scopes.values())

    @classmethod
    def load(cls, path: Path) -> AuthConfig:
        raw = load_yaml(path.read_text(), str(path))
        return parse_auth_config(Node(raw, Where(str(path))), path.parent)


def _rate_limit(node: Node) -> RateLimit:
    node.mapping(("requestsPerSecond", "burst"), required=("requestsPerSecond",))
    rate = node.child("requestsPerSecond").number(0.0, 1e-6, 1e9)
    burst = node.child("burst").integer(max(1, math.ceil(rate)), 1, 10**9)
    return RateLimit(rate, burst)


def _read(node: Node, base: Path) -> bytes:
    path = base / node.string()
    try:
        return path.read_bytes()
    except OSError as exc:
        node.fail(f"cannot read {path}: {exc.strerror}")


def _jwt_settings(node: Node, base: Path) -> JwtSettings:
    node.mapping(("issuer", "audiences", "clientClaim", "leeway", "keys"), required=("keys",))
    keys = []
    for item in node.child("keys").items():
        item.mapping(("algorithm", "secretFile", "publicKeyFile", "kid"), required=("algorithm",))
        alg = item.child("algorithm").choice(JWT_ALGORITHMS)
        hmac_alg = alg.startswith("HS")
        wanted, other = (
            ("secretFile", "publicKeyFile") if hmac_alg else ("publicKeyFile", "secretFile")
        )
        if item.has(other) or not item.has(wanted):
            item.fail(f"algorithm {alg} needs {wanted} (and no {other})")
        data = _read(item.child(wanted), base)
        key: bytes | str = data.strip() if hmac_alg else data.decode()
        if hmac_alg and len(key) < 32:
            item.child(wanted).fail(f"an {alg} secret must be at least 32 bytes")
        if not hmac_alg:
            try:
                jwt.get_algorithm_by_name(alg).prepare_key(key)
            except (jwt.InvalidKeyError, ValueError) as exc:
                item.child(wanted).fail(f"not a PEM public key for {alg}: {exc}")
        keys.append(JwtKey((alg,), key, item.child("kid").opt_string()))
    if not keys:
        node.child("keys").fail("needs at least one key")
    return JwtSettings(
        keys=tuple(keys),
        issuer=node.child("issuer").opt_string(),
        audiences=node.child("audiences").string_list(),
        client_claim=node.child("clientClaim").opt_string() or "sub",
        leeway_seconds=node.child("leeway").duration(0.0, allow_zero=True),
    )


def parse_auth_config(node: Node, base: Path) -> AuthConfig:
    node.mapping(("apiKeys", "jwt", "rateLimit", "clients", "exemptMethods", "dataPlane"))
    api_keys: dict[str, str] = {}
    key_scopes: dict[str, frozenset[str]] = {}
    for item in node.child("apiKeys").items():
        item.mapping(("client", "sha256", "scopes"), required=("client", "sha256"))
        digest = item.child("sha256").string().lower()
        if not _HEX64.fullmatch(digest):
            item.child("sha256").fail("must be 64 hex digits (`meshserve auth new-key` prints it)")
        if digest in api_keys:
            item.child("sha256").fail(f"duplicates the key of client {api_keys[digest]!r}")
        api_keys[digest] = item.child("client").string()
        scopes = item.child("scopes").string_list()
        if scopes:
            key_scopes[digest] = frozenset(scopes)
    limits: dict[str, RateLimit] = {}
    for name, client in node.child("clients").entries():
        client.mapping(("rateLimit",), required=("rateLimit",))
        limits[name] = _rate_limit(client.child("rateLimit"))
    config = AuthConfig(
        api_keys=api_keys,
        jwt=_jwt_settings(node.child("jwt"), base) if node.has("jwt") else None,
        rate_limit=_rate_limit(node.child("rateLimit")) if node.has("rateLimit") else None,
        client_limits=limits,
        exempt_methods=node.child("exemptMethods").string_list()
        if node.has("exemptMethods")
        else DEFAULT_EXEMPT,
        key_scopes=key_scopes,
        open_data_plane=node.child("dataPlane").choice(DATA_PLANE_MODES, "authenticated") == "open",
    )
    if not config.api_keys and config.jwt is None:
        node.fail("configures no credentials: add apiKeys or jwt")
    return config


@dataclass(frozen=True)
class Client:
    """An authenticated caller."""

    name: str
    #: "api-key" or "jwt".
    method: str
    #: For JWT: Istio's request principal ``<iss>/<sub>``.
    request_principal: str | None = None
    #: What the credential grants (API key ``scopes``, JWT ``scope``/``scp``).
    scopes: frozenset[str] = frozenset()


class Authenticator:
    """Turns request metadata into a :class:`Client`, or raises :class:`Unauthenticated`."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config

    def authenticate(self, headers: Mapping[str, str]) -> Client:
        for name in CREDENTIAL_HEADERS:
            if name in md.repeated(headers) and name in headers:
                # Which one is meant is a guess; the last one winning let a proxy that
                # appends a header override the client's credential, or the reverse.
                raise Unauthenticated(
                    f"more than one {name!r} header: send one credential per call"
                )
        api_key = headers.get(API_KEY_HEADER)
        authorization = headers.get(AUTHORIZATION_HEADER)
        if api_key is None and authorization is None:
            raise Unauthenticated(
                f"missing credentials: send '{API_KEY_HEADER}: <key>' or "
                f"'{AUTHORIZATION_HEADER}: Bearer <key or JWT>'"
            )
        if api_key is not None:
            return self._api_key(api_key)
        assert authorization is not None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                f"the {AUTHORIZATION_HEADER} header must read 'Bearer <key or JWT>'"
            )
        if token.count(".") == 2 and self.config.jwt is not None:
            return self._jwt(token, self.config.jwt)
        return self._api_key(token)

    def _api_key(self, key: str) -> Client:
        if not self.config.api_keys:
            raise Unauthenticated("API keys are not accepted here; send a JWT")
        digest = hash_key(key)
        # Compare against every stored digest in constant time per comparison.
        found = None
        for stored, client in self.config.api_keys.items():
            if hmac.compare_digest(stored, digest):
                found = client
        if found is None:
            raise Unauthenticated("the API key is not valid")
        return Client(found, "api-key", scopes=self.config.key_scopes.get(digest, frozenset()))

    def _jwt(self, token: str, settings: JwtSettings) -> Client:
        claims = verify(token, settings.keys, settings.verification)
        name = claims.get(settings.client_claim)
        if not isinstance(name, str) or not name:
            raise Unauthenticated(f"JWT lacks the client claim {settings.client_claim!r}")
        issuer = claims.get("iss")
        principal = f"{issuer}/{claims.get('sub')}" if issuer else None
        return Client(name, "jwt", principal, _jwt_scopes(claims))


def _jwt_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth 2.0's ``scope`` (space-separated string) and ``scp`` (a list, or a string)."""
    scopes: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(v for v in value if isinstance(v, str))
    return frozenset(scopes)


def exempt(method: str, patterns: Sequence[str]) -> bool:
    return any(match_value(p, method) for p in patterns)


#: The gateway as AuthorizationPolicy and RequestAuthentication selectors see it, unless
#: started with other ``--labels`` (the same labels a Gateway's selector matches).
GATEWAY_WORKLOAD = Workload(DEFAULT_NAMESPACE, DEFAULT_INGRESS_LABELS)


class ClientGuard:
    """The check for a :class:`mesh.security.guard.GuardInterceptor` on the gateway.

    Authenticates, then (with ``policies``) authorizes with the client's JWT as the request
    principal — Istio's ``requestPrincipals`` at the ingress — then takes a rate-limit
    token, so refused requests spend no quota.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        clock: Clock | None = None,
        policies: Callable[[], Sequence[AuthorizationPolicy]] | None = None,
        workload: Workload = GATEWAY_WORKLOAD,
    ) -> None:
        self.config = config
        self.authenticator = Authenticator(config)
        self.limiter = RateLimiter(
            config.rate_limit, dict(config.client_limits), clock=clock or time.monotonic
        )
        #: Set after construction when the policies live in a gateway built later.
        self.policies = policies
        self.workload = workload
        #: The policy list :meth:`enforces_policies` last judged, and its answer.
        self._judged: object = None
        self._enforces = False

    def enforces_policies(self) -> bool:
        """Whether an AuthorizationPolicy selects this workload now. Asked per call by a
        relay that would otherwise skip the guard (no auth file): judged once per config
        (the list is the running config's, replaced whole on each change)."""
        policies = self.policies() if self.policies is not None else ()
        if policies is not self._judged:
            self._judged = policies
            self._enforces = any(
                applies_to(p.metadata.namespace, p.selector, self.workload) for p in policies
            )
        return self._enforces

    def _authorize(
        self,
        method: str,
        client: Client | None,
        headers: Mapping[str, str],
        identity: JwtIdentity | None = None,
    ) -> None:
        """``client`` None: a call without credentials on an open data plane (no principal,
        as Istio evaluates a request that carries no token). ``identity``: the end-user JWT
        a RequestAuthentication verified; its principal and claims are the request's,
        else the edge credential's JWT principal is."""
        policies = self.policies() if self.policies is not None else ()
        if not policies:
            return
        if identity is not None:
            principal: str | None = identity.principal
            claims: Mapping[str, Any] = identity.claims
        else:
            principal = client.request_principal if client is not None else None
            claims = {}
        request = RequestAttributes(
            path=method, request_principal=principal, request_claims=claims, headers=headers
        )
        decision = evaluate(policies, self.workload, request)
        if not decision.allowed:
            who = f"client {client.name!r}" if client is not None else "anonymous call"
            raise PermissionDenied(f"{who}: {decision.reason}")

    def check(
        self, method: str, headers: Mapping[str, str], identity: JwtIdentity | None = None
    ) -> None:
        """Admits one call or raises: Unauthenticated, PermissionDenied, or
        ResourceExhausted (with a ``grpc-retry-pushback-ms`` trailer when waiting helps).
        ``headers``: the call's text metadata, keys lower-case; ``identity``: its end-user
        JWT, verified by RequestAuthentication."""
        client, wait = self.admit(method, headers, identity)
        if client is None or wait == 0:
            return
        limit = self.limiter.limit_for(client.name)
        assert limit is not None
        if math.isinf(wait):
            raise ResourceExhausted(f"client {client.name!r}: request exceeds the burst size")
        pushback_ms = max(1, math.ceil(wait * 1000))
        raise ResourceExhausted(
            f"rate limit of {limit.rate:g} requests/s (burst {limit.burst}) exceeded by client "
            f"{client.name!r}; retry in {pushback_ms} ms",
            trailers=((RETRY_PUSHBACK_TRAILER, str(pushback_ms)),),
        )

    def admit(
        self, method: str, headers: Mapping[str, str], identity: JwtIdentity | None = None
    ) -> tuple[Client | None, float]:
        """(client, seconds to wait): pure apart from the limiter's buckets."""
        config = self.config
        if method.startswith(ADMIN_METHODS):
            # Never exempt and never open: Admin changes what every client gets.
            client = self._admin(method, headers)
        else:
            # Cheapest first: `up`'s open data plane answers here on the relay's hot path.
            if config.open_data_plane and (
                (API_KEY_HEADER not in headers and AUTHORIZATION_HEADER not in headers)
                or not (config.api_keys or config.jwt)
            ):
                self._authorize(method, None, headers, identity)
                return None, 0.0
            if exempt(method, config.exempt_methods):
                return None, 0.0
            client = self.authenticator.authenticate(headers)
        self._authorize(method, client, headers, identity)
        return client, self.limiter.take(client.name)

    def _admin(self, method: str, headers: Mapping[str, str]) -> Client:
        if not self.config.admin_possible:
            raise PermissionDenied(
                f"{method} is refused: this gateway has no admin credential configured; "
                + HOW_TO_GRANT_ADMIN
            )
        client = self.authenticator.authenticate(headers)
        if ADMIN_SCOPE not in client.scopes:
            raise PermissionDenied(
                f"client {client.name!r} ({client.method}) lacks the {ADMIN_SCOPE!r} scope "
                f"that {ADMIN_METHODS}* needs: list its API key with `scopes: [admin]`, or "
                "issue it a JWT with 'admin' in its scope claim"
            )
        return client

    async def __call__(self, method: str, context: Context) -> None:
        self.check(method, md.from_invocation(context.invocation_metadata()))

    async def admin_only(self, method: str, context: Context) -> None:
        """The admin check alone, for the gRPC server behind a relay that has already
        admitted the call: Admin stays guarded on that path too, and no second rate-limit
        token is spent (admission is the relay's)."""
        if method.startswith(ADMIN_METHODS):
            headers = md.from_invocation(context.invocation_metadata())
            self._authorize(method, self._admin(method, headers), headers)


#: The guard of a gateway started without an auth file: the data plane stays open, and
#: Admin is refused to everyone until an admin credential is configured.
ADMIN_LOCKED = AuthConfig(open_data_plane=True)
