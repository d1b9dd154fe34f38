"""DestinationRule ``trafficPolicy.tls``: how the relay's upstream connection is secured.

Istio's ``ClientTLSSettings``: DISABLE (plaintext), SIMPLE (TLS, server verified), MUTUAL
(TLS presenting the given client certificate), ISTIO_MUTUAL (the mesh's own certificate,
what meshserve's relays use between sidecars). The SSL contexts are built where the relay
dials (``mesh.proxy.upstream_tls``); this module only reads and checks the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mesh.config.fields import Node

TlsMode = Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
TLS_MODES: tuple[TlsMode, ...] = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")


@dataclass(frozen=True)
class ClientTls:
    mode: TlsMode = "ISTIO_MUTUAL"
    #: PEM files (SIMPLE, MUTUAL); ``ca_certificates`` None: the system's trust store.
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    #: The name sent in the TLS handshake and checked against the server's certificate;
    #: None: the destination host.
    sni: str | None = None
    insecure_skip_verify: bool = False

    def describe(self) -> str:
        return self.mode


#: The mesh's own mutual TLS: the default for registered services (Istio's auto mTLS).
ISTIO_MUTUAL = ClientTls()
#: Plaintext: the default for a MESH_EXTERNAL ServiceEntry (no sidecar to speak mTLS to).
DISABLE = ClientTls(mode="DISABLE")


def parse_client_tls(node: Node) -> ClientTls:
    node.mapping(
        (
            "mode",
            "clientCertificate",
            "privateKey",
            "caCertificates",
            "sni",
            "insecureSkipVerify",
        ),
        # credentialName reads a Kubernetes secret; subjectAltNames and caCrl need checks
        # the relay's ssl contexts do not make: refused, not ignored.
        unsupported=("credentialName", "subjectAltNames", "caCrl"),
    )
    # Istio's enum default is DISABLE: a tls block without a mode is plaintext.
    mode: TlsMode = node.child("mode").choice(TLS_MODES, "DISABLE")  # type: ignore[assignment]
    files = {
        key: node.child(key).opt_string()
        for key in ("clientCertificate", "privateKey", "caCertificates")
    }
    sni = node.child("sni").opt_string()
    skip = node.child("insecureSkipVerify").boolean(False)
    if mode in ("DISABLE", "ISTIO_MUTUAL"):
        for key in (*files, "sni", "insecureSkipVerify"):
            if node.has(key):
                node.child(key).fail(
                    f"applies to modes SIMPLE and MUTUAL only, not {mode} "
                    + (
                        "(ISTIO_MUTUAL uses the mesh's own certificates)"
                        if mode == "ISTIO_MUTUAL"
                        else "(plaintext)"
                    )
                )
        return ClientTls(mode=mode)
    if mode == "MUTUAL":
        for key in ("clientCertificate", "privateKey"):
            if files[key] is None:
                node.child(key).fail("is required with mode MUTUAL")
    elif files["clientCertificate"] is not None or files["privateKey"] is not None:
        key = "clientCertificate" if files["clientCertificate"] is not None else "privateKey"
        node.child(key).fail("applies to mode MUTUAL only (SIMPLE presents no certificate)")
    if skip and files["caCertificates"] is not None:
        node.child("insecureSkipVerify").fail("contradicts caCertificates: set one of them")
    return ClientTls(
        mode=mode,
        client_certificate=files["clientCertificate"],
        private_key=files["privateKey"],
        ca_certificates=files["caCertificates"],
        sni=sni,
        insecure_skip_verify=skip,
    )
