"""Gateway: the ports and hosts an ingress serves, and which ingress it configures.

Istio's Gateway selects ingress workloads by label; each server names a port and the
hosts exposed there. A VirtualService applies at that ingress only when its ``gateways``
name the Gateway (``mesh`` names the sidecars). meshserve's ingress is the ``meshserve
gateway`` process, which speaks gRPC over HTTP/2 in clear: the protocols and TLS modes
it cannot serve are refused by name rather than accepted and ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.config.fields import Node
from mesh.config.hosts import CLUSTER_DOMAIN, MESH_NAMESPACE, external_host
from mesh.config.resource import Metadata

#: The reserved gateway name for every sidecar in the mesh (Istio's ``mesh``).
MESH = "mesh"
#: Server protocols the gateway serves: gRPC is HTTP/2, and Envoy's HTTP listener takes
#: HTTP/2 with prior knowledge, which is what a gRPC client sends.
PROTOCOLS = ("GRPC", "HTTP2", "HTTP")
#: Istio's other server protocols, refused with a reason rather than "unknown".
OTHER_PROTOCOLS = ("HTTPS", "GRPC-WEB", "TCP", "TLS", "MONGO", "REDIS", "MYSQL")

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class GatewayHost:
    """One ``hosts`` entry: ``[namespace/]dnsName``.

    ``namespace`` is ``*`` (VirtualServices of any namespace) or a namespace name (``.``
    is resolved to the Gateway's own); ``name`` is ``*``, ``*.suffix`` or a host in the
    normalised form VirtualService hosts take (a mesh FQDN becomes its service name).
    """

    namespace: str
    name: str

    def admits(self, namespace: str, host: str) -> bool:
        """Whether a VirtualService of ``namespace`` may serve ``host`` (normalised) here."""
        return (self.namespace == "*" or self.namespace == namespace) and self.exposes(host)

    def exposes(self, host: str) -> bool:
        """Whether ``host`` (normalised) is among the names this entry exposes."""
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            # A mesh service matches in its FQDN form, as Istio compares full names.
            full = f"{host}.{MESH_NAMESPACE}.{CLUSTER_DOMAIN}" if "." not in host else host
            return full.endswith(self.name[1:])
        return host == self.name

    def describe(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Server:
    """One ``servers[]`` entry: a port and the hosts exposed on it."""

    index: int
    port: int
    protocol: str
    hosts: tuple[GatewayHost, ...]
    port_name: str = ""
    name: str = ""


@dataclass(frozen=True)
class Gateway:
    metadata: Metadata
    #: Labels of the ingress workloads it configures; empty selects every ingress.
    selector: tuple[tuple[str, str], ...]
    servers: tuple[Server, ...]

    @property
    def ref(self) -> str:
        return f"Gateway/{self.metadata.name}"

    @property
    def qualified(self) -> str:
        """``namespace/name``: how VirtualService ``gateways`` entries resolve to it."""
        return f"{self.metadata.namespace}/{self.metadata.name}"

    def selects(self, labels: tuple[tuple[str, str], ...]) -> bool:
        """Istio's selector: every selector label is among the workload's labels."""
        return set(self.selector) <= set(labels)

    def servers_on(self, port: int | None) -> tuple[Server, ...]:
        """The servers for a listener on ``port`` (None: every server)."""
        return tuple(s for s in self.servers if port is None or s.port == port)


def qualify(name: str, namespace: str) -> str:
    """A VirtualService ``gateways`` entry as ``namespace/name`` (``mesh`` stays).

    Istio still resolves its legacy forms, ``name.namespace`` and
    ``name.namespace.svc.cluster.local``, to ``namespace/name`` (with a warning): so does
    meshserve, rather than look for a Gateway called ``name.namespace`` in the
    VirtualService's namespace and refuse a file Istio routes."""
    if name == MESH or "/" in name:
        return name
    if "." in name:
        gateway, legacy_namespace = name.split(".")[:2]
        return f"{legacy_namespace}/{gateway}"
    return f"{namespace}/{name}"


def parse_gateway(spec: Node, metadata: Metadata) -> Gateway:
    spec.mapping(("selector", "servers"), required=("servers",))
    servers = tuple(
        _server(node, index, metadata.namespace)
        for index, node in enumerate(spec.child("servers").items())
    )
    if not servers:
        spec.child("servers").fail("must list at least one server")
    return Gateway(
        metadata=metadata,
        selector=tuple(sorted(spec.child("selector").string_map().items())),
        servers=servers,
    )


def _server(node: Node, index: int, namespace: str) -> Server:
    node.mapping(
        ("port", "hosts", "name", "tls"),
        # bind: an address or socket of the ingress' own host; defaultEndpoint: where the
        # ingress forwards (sidecar ingress only). meshserve's gateway has neither.
        unsupported=("bind", "defaultEndpoint"),
        required=("port", "hosts"),
    )
    if node.has("tls"):
        _refuse_tls(node.child("tls"))
    port = node.child("port").mapping(
        ("number", "name", "protocol", "targetPort"), required=("number", "protocol")
    )
    protocol = port.child("protocol").string().upper()
    if protocol not in PROTOCOLS:
        why = (
            "meshserve's gateway serves gRPC over HTTP/2 in clear"
            if protocol in OTHER_PROTOCOLS
            else "not an Istio protocol"
        )
        port.child("protocol").fail(
            f"protocol {protocol!r}: {why}; use one of {', '.join(PROTOCOLS)}"
        )
    # targetPort applies to ServiceEntries in Istio and has no effect on a Gateway's
    # listener: checked as a port number, and like Istio, not used.
    port.child("targetPort").integer(0, 0, 65535)
    hosts = tuple(_host(item, namespace) for item in node.child("hosts").items())
    if not hosts:
        node.child("hosts").fail("must name at least one host")
    return Server(
        index=index,
        port=port.child("number").integer(0, 1, 65535),
        protocol=protocol,
        hosts=hosts,
        port_name=port.child("name").opt_string() or "",
        name=node.child("name").opt_string() or "",
    )


def _refuse_tls(node: Node) -> None:
    """meshserve's gateway does not terminate client TLS (its listener is gRPC in clear;
    mTLS is between it and the sidecars): every server TLS setting is refused naming the
    field, so a Gateway never looks encrypted while it is not."""
    node.mapping(
        (),
        unsupported=(
            "mode",
            "httpsRedirect",
            "serverCertificate",
            "privateKey",
            "caCertificates",
            "caCrl",
            "credentialName",
            "credentialNames",
            "subjectAltNames",
            "verifyCertificateSpki",
            "verifyCertificateHash",
            "minProtocolVersion",
            "maxProtocolVersion",
            "cipherSuites",
            "tlsCertificates",
        ),
    )


def _host(node: Node, namespace: str) -> GatewayHost:
    text = node.string()
    ns, _, name = text.rpartition("/")
    if not _:
        ns = "*"  # no namespace/: VirtualServices of any namespace (Istio)
    elif ns == ".":
        ns = namespace
    elif ns != "*" and not _NAMESPACE.fullmatch(ns):
        node.fail(f"{text!r}: the namespace part must be '*', '.' or a namespace name")
    if name == "*":
        return GatewayHost(ns, name)
    wildcard = name.startswith("*.")
    try:
        normalised = external_host(name[2:] if wildcard else name)
    except ValueError as exc:
        node.fail(str(exc))
    if wildcard:
        # Compared against full names, so keep the suffix whole (not normalised).
        return GatewayHost(ns, "*." + name[2:].lower().rstrip("."))
    return GatewayHost(ns, normalised)
