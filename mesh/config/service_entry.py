"""ServiceEntry: hosts whose endpoints are listed in config (outside the registry).

A model server that does not run next to a sidecar (another team's Triton, a managed
endpoint) becomes a routable host: VirtualService rules, retries, timeouts and the
DestinationRule's balancing, outlier detection and ``tls`` apply to it as to a mesh service.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from mesh.balance.endpoints import Endpoint
from mesh.config.fields import Node
from mesh.config.hosts import external_host
from mesh.config.resource import Metadata, export_to

Resolution = Literal["STATIC", "DNS", "DNS_ROUND_ROBIN"]
Location = Literal["MESH_EXTERNAL", "MESH_INTERNAL"]
#: Port protocols the relay speaks upstream: gRPC rides HTTP/2.
PROTOCOLS = ("GRPC", "HTTP2", "GRPC-WEB")
#: Endpoint weights the balancers take (``meshserve.io/weight``'s range).
MAX_WEIGHT = 128


@dataclass(frozen=True)
class ServiceEntry:
    metadata: Metadata
    hosts: tuple[str, ...]
    port: int
    port_name: str
    location: Location
    resolution: Resolution
    #: Every host's endpoints (the same for each host, as in Istio).
    endpoints: tuple[Endpoint, ...]
    export_to: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"ServiceEntry/{self.metadata.name}"

    @property
    def external(self) -> bool:
        """MESH_EXTERNAL: no sidecar at the endpoints, so no mesh mTLS by default."""
        return self.location == "MESH_EXTERNAL"


def parse_service_entry(spec: Node, metadata: Metadata) -> ServiceEntry:
    spec.mapping(
        ("hosts", "ports", "location", "resolution", "endpoints", "exportTo"),
        # addresses: VIPs for calls captured by IP, which meshserve never sees (a call names
        # a host); workloadSelector: WorkloadEntry selection; subjectAltNames: SAN checks
        # on the mesh certificate that meshserve's mTLS does not make.
        unsupported=("addresses", "workloadSelector", "subjectAltNames"),
        required=("hosts", "ports"),
    )
    hosts: list[str] = []
    for node in spec.child("hosts").items():
        text = node.string()
        if text.startswith("*"):
            node.fail(
                "wildcard hosts are an Istio form that meshserve does not support "
                "(every host needs its own endpoints)"
            )
        try:
            hosts.append(external_host(text))
        except ValueError as exc:
            node.fail(str(exc))
    if not hosts:
        spec.child("hosts").fail("must name at least one host")
    ports = list(spec.child("ports").items())
    if len(ports) != 1:
        spec.child("ports").fail(
            "must list exactly one port: a meshserve call names a host, not a port, so a "
            "second port could never be chosen"
        )
    port_node = ports[0].mapping(
        ("number", "protocol", "name", "targetPort"), required=("number", "name")
    )
    number = port_node.child("number").integer(0, 1, 65535)
    name = port_node.child("name").string()
    protocol = port_node.child("protocol").value
    if protocol is not None and port_node.child("protocol").string().upper() not in PROTOCOLS:
        port_node.child("protocol").fail(
            f"must be one of {', '.join(PROTOCOLS)} (meshserve relays gRPC over HTTP/2), "
            f"got {protocol!r}"
        )
    target = port_node.child("targetPort").integer(0, 0, 65535) or number
    location: Location = spec.child("location").choice(  # type: ignore[assignment]
        ("MESH_EXTERNAL", "MESH_INTERNAL"), "MESH_EXTERNAL"
    )
    resolution_node = spec.child("resolution")
    resolution = resolution_node.choice(("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"), "NONE")
    if resolution == "NONE":
        # Istio forwards to the IP the caller dialled; a meshserve call names a host and
        # carries no original destination to forward to.
        resolution_node.fail(
            "NONE (Istio's default) is a resolution meshserve does not support: a call "
            "names a host, not an address to pass through; use STATIC or DNS"
        )
    endpoints = _endpoints(spec.child("endpoints"), resolution, name, target, metadata.name)
    if not endpoints:
        if resolution == "STATIC":
            spec.child("endpoints").fail("resolution STATIC needs at least one endpoint")
        # DNS without endpoints: the hosts themselves are resolved (Istio's rule).
        endpoints = tuple(Endpoint(f"{h}:{target}", f"{metadata.name}/{h}") for h in hosts)
    return ServiceEntry(
        metadata=metadata,
        hosts=tuple(hosts),
        port=number,
        port_name=name,
        location=location,
        resolution=resolution,  # type: ignore[arg-type]
        endpoints=tuple(sorted(endpoints)),
        export_to=export_to(spec.child("exportTo"), metadata.namespace),
    )


def _endpoints(
    node: Node, resolution: str, port_name: str, target: int, entry: str
) -> tuple[Endpoint, ...]:
    found: dict[str, Endpoint] = {}
    for item in node.items():
        item.mapping(
            ("address", "ports", "labels", "weight"),
            # locality and network feed locality balancing and multi-network gateways,
            # which meshserve does not do: refused rather than ignored.
            unsupported=("locality", "network", "serviceAccount"),
            required=("address",),
        )
        address_node = item.child("address")
        address = address_node.string()
        if address.startswith("unix://"):
            address_node.fail("unix socket endpoints are an Istio form meshserve does not support")
        if resolution == "STATIC":
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                address_node.fail(f"resolution STATIC needs an IP address, got {address!r}")
            host = f"[{ip}]" if ip.version == 6 else str(ip)
        else:
            try:
                host = external_host(address, any_name=True)
            except ValueError as exc:
                address_node.fail(str(exc))
        ports = item.child("ports")
        port = target
        for key, value in ports.entries():
            number = value.integer(0, 1, 65535)
            if key == port_name:
                port = number
            else:
                value.fail(f"names no port of this ServiceEntry (its port is {port_name!r})")
        weight = item.child("weight").integer(1, 0, MAX_WEIGHT) or 1
        labels = tuple(sorted(item.child("labels").string_map().items()))
        full = f"{host}:{port}"
        if full in found:
            address_node.fail(f"duplicate endpoint {full}")
        found[full] = Endpoint(full, f"{entry}/{full}", labels, weight)
    return tuple(found.values())
