"""AuthorizationPolicy evaluation in Istio's order, and the interceptor that enforces it."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mesh.config.regex import Regex
from mesh.config.security import (
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
    path_template,
)
from mesh.errors import PermissionDenied
from mesh.routing import headers as md
from mesh.security.guard import Context
from mesh.security.peer import PeerInfo, peer_from_context
from mesh.security.workload import ROOT_NAMESPACE, Workload, applies_to

log = logging.getLogger(__name__)

#: gRPC is HTTP/2 POST, so ``methods`` in a policy only ever meet this value.
GRPC_METHOD = "POST"


@dataclass(frozen=True)
class RequestAttributes:
    """What a policy can look at, gathered once per call."""

    #: ``/package.Service/Method``.
    path: str
    #: The peer's principal in Istio's form ``<td>/ns/<ns>/sa/<sa>``; None without mTLS.
    principal: str | None = None
    #: The peer's namespace (from its SPIFFE id); None without mTLS.
    source_namespace: str | None = None
    source_ip: str | None = None
    #: ``<iss>/<sub>`` of a JWT validated by this same process (RequestAuthentication, or
    #: the gateway's edge credential); None: none was. Never taken from metadata, which a
    #: client could forge through a proxy.
    request_principal: str | None = None
    #: The claims of that JWT (``request.auth.claims[...]``); empty without one.
    request_claims: Mapping[str, Any] = field(default_factory=dict)
    #: The ``:authority`` the caller addressed.
    host: str | None = None
    port: int | None = None
    method: str = GRPC_METHOD
    #: Request metadata, keys lower-case.
    headers: Mapping[str, str] = field(default_factory=dict)


def match_value(pattern: str, value: str | None) -> bool:
    """Istio string matching: exact, ``prefix*``, ``*suffix``, or ``*`` (any non-empty)."""
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


@lru_cache(maxsize=1024)
def _template(pattern: str) -> Regex:
    # Validated at load (mesh/config/security.py); compiled once per pattern here.
    return path_template(pattern)


def match_path(pattern: str, path: str | None) -> bool:
    """A ``paths`` entry: a path template when it has ``{*}``/``{**}``, else as
    :func:`match_value`."""
    if "{" in pattern:
        return path is not None and _template(pattern).fullmatch(path)
    return match_value(pattern, path)


def _paths(values: Sequence[str], not_values: Sequence[str], path: str) -> bool:
    if values and not any(match_path(p, path) for p in values):
        return False
    return not any(match_path(p, path) for p in not_values)


def _hosts(values: Sequence[str], not_values: Sequence[str], host: str | None) -> bool:
    # Host names are case-insensitive (RFC 4343); Istio matches ``hosts`` ignoring case.
    lowered = None if host is None else host.lower()
    return _field(tuple(v.lower() for v in values), tuple(v.lower() for v in not_values), lowered)


def service_account(principal: str | None) -> str | None:
    """``<namespace>/<service account>`` of a principal ``<td>/ns/<ns>/sa/<sa>``."""
    if principal is None:
        return None
    parts = principal.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return f"{parts[2]}/{parts[4]}"
    return None


def _field(values: Sequence[str], not_values: Sequence[str], value: str | None) -> bool:
    """An empty list matches anything; ``not`` values exclude (an absent value is no match)."""
    if values and not any(match_value(p, value) for p in values):
        return False
    return not any(match_value(p, value) for p in not_values)


def _ip_field(blocks: Sequence[str], not_blocks: Sequence[str], ip: str | None) -> bool:
    def inside(block: str) -> bool:
        if ip is None:
            return False
        try:
            return ipaddress.ip_address(ip) in ipaddress.ip_network(block, strict=False)
        except ValueError:
            return False

    if blocks and not any(inside(b) for b in blocks):
        return False
    return not any(inside(b) for b in not_blocks)


def source_matches(source: Source, request: RequestAttributes, *, deny: bool = False) -> bool:
    return (
        _field(source.principals, source.not_principals, request.principal)
        and _field(
            source.request_principals, source.not_request_principals, request.request_principal
        )
        and _field(source.namespaces, source.not_namespaces, request.source_namespace)
        and _ip_field(source.ip_blocks, source.not_ip_blocks, request.source_ip)
        and _ip_field(source.remote_ip_blocks, source.not_remote_ip_blocks, request.source_ip)
        and _exact(
            source.service_accounts,
            source.not_service_accounts,
            service_account(request.principal),
        )
    )


def _exact(values: Sequence[str], not_values: Sequence[str], value: str | None) -> bool:
    if values and value not in values:
        return False
    return value is None or value not in not_values


def operation_matches(op: Operation, request: RequestAttributes) -> bool:
    port = None if request.port is None else str(request.port)
    return (
        _paths(op.paths, op.not_paths, request.path)
        and _field(op.methods, op.not_methods, request.method)
        and _hosts(op.hosts, op.not_hosts, request.host)
        and _field(op.ports, op.not_ports, port)
    )


#: ``when`` keys meshserve evaluates (Istio's names); ``request.headers[...]`` besides.
CONDITION_KEYS: dict[str, Callable[[RequestAttributes], str | None]] = {
    "source.principal": lambda r: r.principal,
    "source.namespace": lambda r: r.source_namespace,
    "source.ip": lambda r: r.source_ip,
    # Without trusted proxies (Istio's default numTrustedProxies 0) the client is the peer.
    "remote.ip": lambda r: r.source_ip,
    "destination.port": lambda r: None if r.port is None else str(r.port),
}


def claim_path(key: str) -> tuple[str, ...] | None:
    """``request.auth.claims[a][b]`` → ("a", "b"); None for another key."""
    prefix = "request.auth.claims["
    if not key.startswith(prefix) or not key.endswith("]"):
        return None
    names = tuple(key[len(prefix) - 1 :].strip("[]").split("]["))
    return names if all(names) and not any("[" in n or "]" in n for n in names) else None


def _claim_values(claims: Mapping[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    """A claim's string values: a string, or each string of a list (Istio matches any)."""
    value: Any = claims
    for name in names:
        if not isinstance(value, Mapping) or name not in value:
            return ()
        value = value[name]
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    if isinstance(value, bool):
        return ("true" if value else "false",)
    if isinstance(value, (int, float)):
        return (str(value),)
    return ()


def _condition_values(key: str, request: RequestAttributes) -> tuple[bool, tuple[str, ...]]:
    """(known key, the attribute's values: none when absent, several for list claims)."""
    if key.startswith("request.headers[") and key.endswith("]"):
        header = request.headers.get(key[len("request.headers[") : -1].lower())
        return True, () if header is None else (header,)
    claims = request.request_claims
    if key == "request.auth.principal":
        principal = request.request_principal
        return True, () if principal is None else (principal,)
    if key == "request.auth.audiences":
        return True, _claim_values(claims, ("aud",))
    if key == "request.auth.presenter":
        return True, _claim_values(claims, ("azp",))
    names = claim_path(key)
    if names is not None:
        return True, _claim_values(claims, names)
    getter = CONDITION_KEYS.get(key)
    if getter is None:
        return False, ()
    value = getter(request)
    return True, () if value is None else (value,)


def condition_matches(cond: Condition, request: RequestAttributes, *, deny: bool) -> bool:
    known, values = _condition_values(cond.key, request)
    if not known:
        # Fail closed, as Istio does for attributes it cannot evaluate: such a rule always
        # matches in a DENY policy and never in an ALLOW policy.
        return deny
    if cond.key in ("source.ip", "remote.ip"):
        return _ip_field(cond.values, cond.not_values, values[0] if values else None)
    if deny and values and cond.key.startswith("request.headers["):
        # A repeated header arrives joined ("admin,bob" or "bob,admin"), which Envoy
        # matches whole, so a DENY on "admin" or "admin*" misses it while the worker still
        # reads "admin". A DENY also matches each comma-separated element (RFC 9110 §5.3:
        # a list header means the same folded or repeated); ``notValues`` still meet the
        # whole value, so neither half can dodge. ALLOW matches the whole value only.
        whole = values[0]
        pieces = tuple(v.strip() for v in whole.split(",")) if "," in whole else ()
        if cond.values and not any(
            match_value(p, v) for p in cond.values for v in (whole, *pieces)
        ):
            return False
        return not any(match_value(p, whole) for p in cond.not_values)
    # A multi-valued attribute (a list claim, several audiences) matches ``values`` when
    # any of its values does, and is excluded by ``notValues`` when any does.
    if cond.values and not any(match_value(p, v) for p in cond.values for v in values):
        return False
    return not any(match_value(p, v) for p in cond.not_values for v in values)


def rule_matches(rule: Rule, request: RequestAttributes, *, deny: bool) -> bool:
    """Any ``from``, any ``to``, every ``when``; an absent section matches everything."""
    return (
        (not rule.sources or any(source_matches(s, request, deny=deny) for s in rule.sources))
        and (not rule.operations or any(operation_matches(o, request) for o in rule.operations))
        and all(condition_matches(c, request, deny=deny) for c in rule.conditions)
    )


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    #: Why, naming the policy and rule that decided (for the client and the logs).
    reason: str
    policy: str | None = None
    rule: int | None = None


#: The decision when no policy applies to the workload (no ALLOW policy: allowed).
_NONE_APPLY = AuthzDecision(True, "no ALLOW policy applies")


def _where(policy: AuthorizationPolicy) -> str:
    return f"{policy.ref} ({policy.metadata.namespace}, {policy.metadata.source})"


def applicable_policies(
    policies: Sequence[AuthorizationPolicy],
    workload: Workload,
    root_namespace: str = ROOT_NAMESPACE,
) -> tuple[AuthorizationPolicy, ...]:
    """The policies that apply to ``workload``, in evaluation order (namespace, name)."""
    return tuple(
        sorted(
            (
                p
                for p in policies
                if applies_to(p.metadata.namespace, p.selector, workload, root_namespace)
            ),
            key=lambda p: (p.metadata.namespace, p.metadata.name),
        )
    )


def evaluate(
    policies: Sequence[AuthorizationPolicy],
    workload: Workload,
    request: RequestAttributes,
    *,
    root_namespace: str = ROOT_NAMESPACE,
) -> AuthzDecision:
    """Istio's order: DENY, then ALLOW (CUSTOM is refused at load).

    Any matching DENY rule denies. If any ALLOW policy applies to the workload, the request
    must match one of their rules (an ALLOW policy without rules therefore denies all);
    with none, it is allowed. AUDIT policies only log.
    """
    return evaluate_applicable(applicable_policies(policies, workload, root_namespace), request)


def evaluate_applicable(
    applicable: Sequence[AuthorizationPolicy], request: RequestAttributes
) -> AuthzDecision:
    """:func:`evaluate` over policies already filtered and ordered by
    :func:`applicable_policies` (which a caller checking many calls does once per set)."""
    if not applicable:
        return _NONE_APPLY
    for policy in applicable:
        if policy.action == "AUDIT":
            for i, rule in enumerate(policy.rules):
                if rule_matches(rule, request, deny=False):
                    log.info("audit: %s rule %d matched %s", policy.ref, i, request.path)
    for policy in applicable:
        if policy.action != "DENY":
            continue
        for i, rule in enumerate(policy.rules):
            if rule_matches(rule, request, deny=True):
                return AuthzDecision(
                    False,
                    f"RBAC: access denied by {_where(policy)} rule {i}",
                    policy.ref,
                    i,
                )
    allows = [p for p in applicable if p.action == "ALLOW"]
    if not allows:
        return AuthzDecision(True, "no ALLOW policy applies")
    for policy in allows:
        for i, rule in enumerate(policy.rules):
            if rule_matches(rule, request, deny=False):
                return AuthzDecision(True, f"allowed by {policy.ref} rule {i}", policy.ref, i)
    names = ", ".join(p.ref for p in allows)
    return AuthzDecision(False, f"RBAC: access denied: no rule of {names} allows {request.path}")


def attributes_from_context(
    path: str, context: Context, *, port: int | None = None, peer: PeerInfo | None = None
) -> RequestAttributes:
    """Gathers a call's attributes from grpc: metadata, peer address and TLS identity."""
    peer = peer or peer_from_context(context)
    # Repeated names joined (mesh/routing/headers.py as_dict): one value of several would
    # let a caller repeat a header to dodge a DENY on it.
    headers = md.from_invocation(context.invocation_metadata())
    identity = peer.identity
    return RequestAttributes(
        path=path,
        principal=peer.principal,
        source_namespace=None if identity is None else identity.namespace,
        source_ip=_peer_ip(context.peer()),
        host=headers.get(":authority"),
        port=port,
        headers=headers,
    )


def _peer_ip(peer: str | None) -> str | None:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` → the address."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return None


class Authorizer:
    """The check a :class:`mesh.security.guard.GuardInterceptor` runs for authorization.

    ``policies`` is a callable so a config reload (a new snapshot) applies to the next
    call without rebuilding the server.
    """

    def __init__(
        self,
        policies: Callable[[], Sequence[AuthorizationPolicy]],
        workload: Workload,
        *,
        port: int | None = None,
        root_namespace: str = ROOT_NAMESPACE,
    ) -> None:
        self._policies = policies
        self._workload = workload
        self._port = port
        self._root = root_namespace
        #: The policy sequence last seen, and which of its policies apply to the workload.
        self._for: Sequence[AuthorizationPolicy] | None = None
        self._applicable: tuple[AuthorizationPolicy, ...] = ()

    async def __call__(self, method: str, context: Context) -> None:
        self.check(attributes_from_context(method, context, port=self._port))

    def check(self, request: RequestAttributes) -> None:
        """Raises :class:`PermissionDenied` naming the policy when ``request`` is refused
        (also what the sidecar's HTTP/2 relay calls, with attributes it read itself)."""
        policies = self._policies()
        if policies is not self._for:
            # Filtered and ordered once per policy set (a reload swaps the sequence), not
            # per call: on a sidecar's relay this ran for every call it admitted.
            self._for = policies
            self._applicable = applicable_policies(policies, self._workload, self._root)
        decision = evaluate_applicable(self._applicable, request)
        if not decision.allowed:
            log.info(
                "%s from %s: %s", request.path, request.principal or "anonymous", decision.reason
            )
            raise PermissionDenied(decision.reason)
