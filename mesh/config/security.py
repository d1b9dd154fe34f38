"""PeerAuthentication and AuthorizationPolicy, validated for the security layer to enforce."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from mesh.config.fields import Node
from mesh.config.regex import Regex, compile_regex
from mesh.config.resource import Metadata

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
Action = Literal["ALLOW", "DENY", "AUDIT"]


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
    #: The client's address; without trusted proxies in front (meshserve has none, as
    #: Istio's default numTrustedProxies 0) that is the peer's, like ``ipBlocks``.
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    #: ``<namespace>/<service account>`` of the peer's certificate.
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()


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
    levels = spec.child("portLevelMtls")
    if levels.value is not None and not isinstance(levels.value, dict):
        levels.fail("must be a mapping of port numbers to {mode}")
    for key, raw in (levels.value or {}).items():
        # Istio documents numeric keys (``8090: {mode: STRICT}``); YAML reads them as
        # integers, while a quoted "8090" is a string: both name the port.
        value = Node(raw, levels.where, f"{levels.path}.{key}")
        text = str(key)
        if isinstance(key, bool) or not text.isdigit() or not 1 <= int(text) <= 65535:
            value.fail("port keys must be numbers in [1, 65535]")
        value.mapping(("mode",), required=("mode",))
        ports.append((int(text), value.child("mode").choice(MTLS_MODES)))  # type: ignore[arg-type]
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
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
}
_IP_FIELDS = ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
#: ``when`` keys the security layer evaluates (Istio's names), besides
#: ``request.headers[<name>]``. Any other key is refused at load: evaluating it would fail
#: closed at run time, a policy quietly not doing what it says.
CONDITION_KEYS = (
    "source.principal",
    "source.namespace",
    "source.ip",
    "remote.ip",
    "destination.port",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
)
#: ``request.auth.claims[<name>]``, nested as ``request.auth.claims[<a>][<b>]``.
_CLAIM_KEY = re.compile(r"request\.auth\.claims(\[[^\[\]]+\])+")
_SERVICE_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?")
#: Istio's path templates (Envoy URI templates): {*} within one segment, {**} the rest.
_TEMPLATE = re.compile(r"\{[^}]*\}")
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
    action_node = spec.child("action")
    if action_node.value == "CUSTOM":
        # CUSTOM delegates to an external authorizer meshserve has none of; accepting it
        # would skip the policy, so it could never deny anything.
        action_node.fail("CUSTOM is an Istio action that meshserve does not support")
    spec.mapping(
        ("selector", "action", "rules"),
        unsupported=("targetRef", "targetRefs", "provider"),
    )
    action = action_node.choice(("ALLOW", "DENY", "AUDIT"), "ALLOW")
    rules = []
    for rule in spec.child("rules").items():
        rule.mapping(("from", "to", "when"))
        sources = [_source(item) for item in rule.child("from").items()]
        operations = [_operation(item) for item in rule.child("to").items()]
        conditions = [_condition(item) for item in rule.child("when").items()]
        rules.append(Rule(tuple(sources), tuple(operations), tuple(conditions)))
    return AuthorizationPolicy(
        metadata=metadata,
        selector=_selector(spec.child("selector")),
        action=action,  # type: ignore[arg-type]
        rules=tuple(rules),
    )


def _source(item: Node) -> Source:
    item.mapping(("source",), required=("source",))
    src = item.child("source").mapping(tuple(_SOURCE_FIELDS))
    values = {attr: src.child(key).string_list() for key, attr in _SOURCE_FIELDS.items()}
    for key in _IP_FIELDS:
        for block in src.child(key).items():
            try:
                ipaddress.ip_network(block.string(), strict=False)
            except ValueError:
                block.fail(f"is not an IP address or CIDR block: {block.value!r}")
    for key in ("serviceAccounts", "notServiceAccounts"):
        for account in src.child(key).items():
            if not _SERVICE_ACCOUNT.fullmatch(account.string()):
                account.fail(
                    f"must be <namespace>/<service account> (no wildcards), got {account.value!r}"
                )
    return Source(**values)


def _operation(item: Node) -> Operation:
    item.mapping(("operation",), required=("operation",))
    op = item.child("operation").mapping(tuple(_OPERATION_FIELDS))
    values = {attr: op.child(key).string_list() for key, attr in _OPERATION_FIELDS.items()}
    for key in ("ports", "notPorts"):
        for port in op.child(key).items():
            if not port.string().isdigit() or not 1 <= int(port.string()) <= 65535:
                port.fail("ports are strings of numbers in [1, 65535]")
    for key in ("paths", "notPaths"):
        for path in op.child(key).items():
            if "{" in path.string() or "}" in path.string():
                try:
                    path_template(path.string())
                except ValueError as exc:
                    path.fail(str(exc))
    return Operation(**values)


def _condition(item: Node) -> Condition:
    item.mapping(("key", "values", "notValues"), required=("key",))
    key_node = item.child("key")
    key = key_node.string()
    header = key.startswith("request.headers[") and key.endswith("]") and len(key) > 17
    if not header and key not in CONDITION_KEYS and not _CLAIM_KEY.fullmatch(key):
        key_node.fail(
            f"{key!r} is an Istio condition that meshserve does not support (supported: "
            f"request.headers[<name>], request.auth.claims[<name>], {', '.join(CONDITION_KEYS)})"
        )
    cond = Condition(
        key=key,
        values=item.child("values").string_list(),
        not_values=item.child("notValues").string_list(),
    )
    if not cond.values and not cond.not_values:
        item.fail("needs values or notValues")
    if key in ("source.ip", "remote.ip"):
        for name in ("values", "notValues"):
            for block in item.child(name).items():
                try:
                    ipaddress.ip_network(block.string(), strict=False)
                except ValueError:
                    block.fail(f"is not an IP address or CIDR block: {block.value!r}")
    return cond


def path_template(text: str) -> Regex:
    """An Istio path template as a full-match RE2: ``{*}`` is at least one character
    within a path segment (no ``/``), ``{**}`` any number of segments and must be the
    last operator, as Envoy's URI templates define them; any other ``{...}`` raises
    ``ValueError``."""
    parts: list[str] = []
    position = 0
    operators = list(_TEMPLATE.finditer(text))
    for index, found in enumerate(operators):
        operator = found.group(0)
        if operator not in ("{*}", "{**}"):
            raise ValueError(f"path template operator {operator} is not {{*}} or {{**}}")
        if operator == "{**}" and index != len(operators) - 1:
            raise ValueError("{**} must be the last operator of a path template")
        parts.append(re.escape(text[position : found.start()]))
        parts.append("[^/]+" if operator == "{*}" else ".*")
        position = found.end()
    rest = text[position:]
    if "{" in rest or "}" in rest:
        raise ValueError("unbalanced { or } in a path template")
    parts.append(re.escape(rest))
    return compile_regex("".join(parts))
