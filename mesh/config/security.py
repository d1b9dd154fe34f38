"""PeerAuthentication and AuthorizationPolicy, validated for the security layer to enforce."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from mesh.config.fields import Node
from mesh.config.resource import Metadata

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
Action = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]


@dataclass(frozen=True)
class PeerAuthentication:
    """Which mTLS mode workloads selected by labels accept (empty selector: namespace-wide)."""

    metadata: Metadata
    selector: tuple[tuple[str, str], ...]
    mode: MtlsMode
    #: Overrides per port number.
    port_modes: tuple[tuple[int, MtlsMode], ...] = ()

    @property
    def ref(self) -> str:
        return f"PeerAuthentication/{self.metadata.name}"


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    #: gRPC paths "/package.Service/Method"; Istio allows a leading or trailing "*".
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """Matches when any ``from`` and any ``to`` and every ``when`` match (absent: match all)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    metadata: Metadata
    selector: tuple[tuple[str, str], ...]
    action: Action
    rules: tuple[Rule, ...]
    #: Extension provider name for CUSTOM.
    provider: str | None = None

    @property
    def ref(self) -> str:
        return f"AuthorizationPolicy/{self.metadata.name}"


def _selector(node: Node) -> tuple[tuple[str, str], ...]:
    if node.value is None:
        return ()
    node.mapping(("matchLabels",))
    return tuple(sorted(node.child("matchLabels").string_map().items()))


def parse_peer_authentication(spec: Node, metadata: Metadata) -> PeerAuthentication:
    spec.mapping(("selector", "mtls", "portLevelMtls"))
    mode: str = "UNSET"
    if spec.has("mtls"):
        mtls = spec.child("mtls").mapping(("mode",))
        mode = mtls.child("mode").choice(MTLS_MODES, "UNSET")
    ports: list[tuple[int, MtlsMode]] = []
    for key, value in spec.child("portLevelMtls").entries():
        if not key.isdigit() or not 1 <= int(key) <= 65535:
            value.fail("port keys must be numbers in [1, 65535]")
        value.mapping(("mode",), required=("mode",))
        ports.append((int(key), value.child("mode").choice(MTLS_MODES)))  # type: ignore[arg-type]
    if ports and not spec.has("selector"):
        spec.child("portLevelMtls").fail(
            "needs a selector (Istio applies port-level mTLS per workload)"
        )
    return PeerAuthentication(
        metadata=metadata,
        selector=_selector(spec.child("selector")),
        mode=mode,  # type: ignore[arg-type]
        port_modes=tuple(sorted(ports)),
    )


_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
}
_OPERATION_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}


def parse_authorization_policy(spec: Node, metadata: Metadata) -> AuthorizationPolicy:
    spec.mapping(
        ("selector", "action", "rules", "provider"), unsupported=("targetRef", "targetRefs")
    )
    action = spec.child("action").choice(("ALLOW", "DENY", "AUDIT", "CUSTOM"), "ALLOW")
    provider = None
    if spec.has("provider"):
        provider = (
            spec.child("provider").mapping(("name",), required=("name",)).child("name").string()
        )
    if (action == "CUSTOM") != (provider is not None):
        spec.child("provider").fail("is required with action CUSTOM and only then")
    rules = []
    for rule in spec.child("rules").items():
        rule.mapping(("from", "to", "when"))
        sources = []
        for item in rule.child("from").items():
            item.mapping(("source",), required=("source",))
            src = item.child("source").mapping(tuple(_SOURCE_FIELDS))
            values = {attr: src.child(key).string_list() for key, attr in _SOURCE_FIELDS.items()}
            for key in ("ipBlocks", "notIpBlocks"):
                for block in src.child(key).items():
                    try:
                        ipaddress.ip_network(block.string(), strict=False)
                    except ValueError:
                        block.fail(f"is not an IP address or CIDR block: {block.value!r}")
            sources.append(Source(**values))
        operations = []
        for item in rule.child("to").items():
            item.mapping(("operation",), required=("operation",))
            op = item.child("operation").mapping(tuple(_OPERATION_FIELDS))
            values = {attr: op.child(key).string_list() for key, attr in _OPERATION_FIELDS.items()}
            for key in ("ports", "notPorts"):
                for port in op.child(key).items():
                    if not port.string().isdigit() or not 1 <= int(port.string()) <= 65535:
                        port.fail("ports are strings of numbers in [1, 65535]")
            operations.append(Operation(**values))
        conditions = []
        for item in rule.child("when").items():
            item.mapping(("key", "values", "notValues"), required=("key",))
            cond = Condition(
                key=item.child("key").string(),
                values=item.child("values").string_list(),
                not_values=item.child("notValues").string_list(),
            )
            if not cond.values and not cond.not_values:
                item.fail("needs values or notValues")
            conditions.append(cond)
        rules.append(Rule(tuple(sources), tuple(operations), tuple(conditions)))
    return AuthorizationPolicy(
        metadata=metadata,
        selector=_selector(spec.child("selector")),
        action=action,  # type: ignore[arg-type]
        rules=tuple(rules),
        provider=provider,
    )
