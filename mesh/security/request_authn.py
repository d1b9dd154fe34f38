"""RequestAuthentication enforced: a call's end-user JWT checked against the rules that
apply to this workload (pure core), and the per-call check the relay runs.

Istio's semantics: a call without a token passes with no request principal (an
AuthorizationPolicy decides whether that is enough); a call with a token that does not
verify — bad signature, wrong issuer or audience, expired, or an issuer no rule names —
is refused with UNAUTHENTICATED; a valid one yields the request principal ``<iss>/<sub>``
and its claims for AuthorizationPolicy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.config.request_authn import JwtRule, RequestAuthentication
from mesh.errors import Unauthenticated
from mesh.routing.headers import repeated
from mesh.security.jwks import JwksCache
from mesh.security.jwt_verify import JwtCheck, JwtKey, unverified_issuer, verify
from mesh.security.workload import ROOT_NAMESPACE, Workload, applies_to

#: The keys of a rule; None: not available yet (a jwksUri not read).
KeyLookup = Callable[[JwtRule], "tuple[JwtKey, ...] | None"]


@dataclass(frozen=True)
class JwtIdentity:
    """A verified token: who it names and what it claims."""

    issuer: str
    subject: str | None
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def principal(self) -> str:
        """Istio's request principal: ``<iss>/<sub>``."""
        return f"{self.issuer}/{self.subject or ''}"


@dataclass(frozen=True)
class AuthnOutcome:
    """What the check found, and the header edits for the call that goes on."""

    identity: JwtIdentity | None = None
    #: Header names (lower-case) removed: a token not forwarded, and every output header
    #: a caller sent itself (it could otherwise forge a verified payload).
    remove: frozenset[str] = frozenset()
    #: Headers added: the verified payload and claims the rules output.
    add: tuple[tuple[str, str], ...] = ()
    #: The headers verified tokens were read from: they are not the gateway's edge
    #: credential, which is checked without them.
    consumed: frozenset[str] = frozenset()


NO_RULES = AuthnOutcome()


def applicable_rules(
    policies: Sequence[RequestAuthentication],
    workload: Workload,
    root_namespace: str = ROOT_NAMESPACE,
) -> tuple[JwtRule, ...]:
    """Every rule of every policy that selects ``workload`` (Istio merges them); for an
    issuer named twice, the first policy in (namespace, name) order wins."""
    rules: dict[str, JwtRule] = {}
    chosen = sorted(
        (
            p
            for p in policies
            if applies_to(p.metadata.namespace, p.selector, workload, root_namespace)
        ),
        key=lambda p: (p.metadata.namespace, p.metadata.name),
    )
    for policy in chosen:
        for rule in policy.jwt_rules:
            rules.setdefault(rule.issuer, rule)
    return tuple(rules.values())


def _output_headers(rules: Sequence[JwtRule]) -> frozenset[str]:
    names = set()
    for rule in rules:
        if rule.output_payload_to_header is not None:
            names.add(rule.output_payload_to_header)
        names.update(header for header, _ in rule.output_claim_to_headers)
    return frozenset(names)


def _extract(value: str, prefix: str) -> str | None:
    if prefix:
        if value[: len(prefix)].lower() != prefix.lower():
            return None
        value = value[len(prefix) :]
    token = value.strip()
    return token or None


def _claim_text(value: Any) -> str | None:
    """A claim as a header value: strings, numbers and booleans (as Envoy copies them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def authenticate(
    rules: Sequence[JwtRule], headers: Mapping[str, str], keys: KeyLookup
) -> AuthnOutcome:
    """Checks the tokens ``headers`` (lower-case names) carry against ``rules``.

    Raises :class:`Unauthenticated` naming the problem for a token that does not verify.
    """
    if not rules:
        return NO_RULES
    remove = set(_output_headers(rules))
    locations: dict[str, list[str]] = {}
    for rule in rules:
        for header, prefix in rule.from_headers:
            locations.setdefault(header, [])
            if prefix not in locations[header]:
                locations[header].append(prefix)
    identity: JwtIdentity | None = None
    add: list[tuple[str, str]] = []
    consumed: set[str] = set()
    for header, prefixes in locations.items():
        value = headers.get(header)
        if value is None:
            continue
        if header in repeated(headers):
            # Which of two tokens to verify would be a guess, and the other one would still
            # reach the worker: one token per call.
            raise Unauthenticated(f"more than one {header!r} header: send one token per call")
        for prefix in prefixes:
            token = _extract(value, prefix)
            if token is None:
                continue
            rule, claims = _verify(token, header, prefix, rules, keys)
            consumed.add(header)
            if not rule.forward_original_token:
                remove.add(header)
            if rule.output_payload_to_header is not None:
                # Envoy forwards the payload as the token carries it: base64url JSON.
                add.append((rule.output_payload_to_header, token.split(".")[1]))
            for out, claim in rule.output_claim_to_headers:
                text = _claim_text(claims.get(claim))
                if text is not None:
                    add.append((out, text))
            if identity is None:
                subject = claims.get("sub")
                identity = JwtIdentity(
                    rule.issuer, subject if isinstance(subject, str) else None, claims
                )
            break
    return AuthnOutcome(identity, frozenset(remove), tuple(add), frozenset(consumed))


def _verify(
    token: str, header: str, prefix: str, rules: Sequence[JwtRule], keys: KeyLookup
) -> tuple[JwtRule, dict[str, Any]]:
    issuer = unverified_issuer(token)
    rule = next((r for r in rules if r.issuer == issuer), None)
    if rule is None:
        if issuer is None:
            raise Unauthenticated(f"the token in {header!r} is not a JWT with an iss claim")
        accepted = ", ".join(r.issuer for r in rules)
        raise Unauthenticated(
            f"JWT issuer {issuer!r} is not accepted here (RequestAuthentication issuers: "
            f"{accepted})"
        )
    if (header, prefix) not in rule.from_headers:
        raise Unauthenticated(
            f"a JWT of issuer {issuer!r} is not accepted in header {header!r} (its rule reads "
            f"{', '.join(h for h, _ in rule.from_headers)})"
        )
    found = rule.inline_keys or keys(rule)
    if found is None:
        raise Unauthenticated(
            f"the JWKS of issuer {issuer!r} ({rule.jwks_uri}) has not been fetched yet"
        )
    return rule, verify(token, found, _check(rule))


#: Envoy's jwt_authn allows this much clock skew on ``exp`` and ``nbf`` (its
#: ``clock_skew_seconds`` default, which Istio does not expose) and never judges ``iat``:
#: without it, a token fresh from an issuer whose clock ran ahead was refused.
CLOCK_SKEW_SECONDS = 60.0


def _check(rule: JwtRule) -> JwtCheck:
    return JwtCheck(
        rule.issuer, rule.audiences, leeway_seconds=CLOCK_SKEW_SECONDS, verify_iat=False
    )


class RequestAuthenticator:
    """The per-call check for one workload, on the policies in force.

    ``policies`` is a callable so a config reload applies to the next call; the rules for
    this workload are worked out once per snapshot, not per call.
    """

    def __init__(
        self,
        policies: Callable[[], Sequence[RequestAuthentication]],
        workload: Workload,
        *,
        root_namespace: str = ROOT_NAMESPACE,
        jwks: JwksCache | None = None,
    ) -> None:
        self._policies = policies
        self.workload = workload
        self._root = root_namespace
        self._seen: Sequence[RequestAuthentication] | None = None
        self._rules: tuple[JwtRule, ...] = ()
        #: The remote key sets; its ``run`` is the background task the owner starts.
        self.jwks = jwks if jwks is not None else JwksCache(self.wanted)

    def rules(self) -> tuple[JwtRule, ...]:
        policies = self._policies()
        if policies is not self._seen:
            self._rules = applicable_rules(policies, self.workload, self._root)
            self._seen = policies
        return self._rules

    def wanted(self) -> list[tuple[str, float]]:
        """(jwksUri, fetch timeout) of the rules in force here."""
        return [(r.jwks_uri, r.timeout) for r in self.rules() if r.jwks_uri is not None]

    def _keys(self, rule: JwtRule) -> tuple[JwtKey, ...] | None:
        return None if rule.jwks_uri is None else self.jwks.keys(rule.jwks_uri)

    def __call__(self, headers: Mapping[str, str]) -> AuthnOutcome:
        rules = self.rules()
        if not rules:
            return NO_RULES
        return authenticate(rules, headers, self._keys)
