"""SSL contexts for the relay's upstream connections, one per DestinationRule ``tls`` setting."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from mesh.config.client_tls import ClientTls


class UpstreamTls:
    """Which SSL context (and server name) a connection to an endpoint uses.

    ISTIO_MUTUAL is the relay's mesh context (``mesh_context``; None when the mesh runs
    without TLS, so the whole mesh is plaintext). SIMPLE and MUTUAL contexts are built
    from their PEM files on first use and kept: a connection opens with no file I/O after
    that.
    """

    def __init__(self, mesh_context: Callable[[], ssl.SSLContext] | None) -> None:
        self._mesh = mesh_context
        self._built: dict[ClientTls, ssl.SSLContext] = {}

    def context(self, tls: ClientTls, host: str) -> tuple[ssl.SSLContext | None, str | None]:
        """(context, server_hostname) for a connection to ``host`` under ``tls``."""
        if tls.mode == "DISABLE":
            return None, None
        if tls.mode == "ISTIO_MUTUAL":
            if self._mesh is None:
                return None, None
            return self._mesh(), host
        context = self._built.get(tls)
        if context is None:
            context = self._built[tls] = build_context(tls)
        return context, tls.sni or host

    def close(self) -> None:
        self._built.clear()


def build_context(tls: ClientTls) -> ssl.SSLContext:
    """A TLS 1.2+ client context offering HTTP/2 for a SIMPLE or MUTUAL setting.

    The server is verified against ``caCertificates`` (the system's trust store when
    absent) and its name against ``sni`` or the destination host, as Envoy verifies with
    Istio's auto SAN validation; ``insecureSkipVerify`` turns both checks off.
    """
    context = ssl.create_default_context(cafile=tls.ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.mode == "MUTUAL":
        assert tls.client_certificate is not None and tls.private_key is not None
        context.load_cert_chain(tls.client_certificate, tls.private_key)
    context.set_alpn_protocols(["h2"])
    return context
