"""Workload certificates that renew themselves before they expire, served to grpc without restarts."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc

from mesh.errors import InvalidArgument
from mesh.security.ca import (
    DEFAULT_WORKLOAD_LIFETIME,
    CertificateAuthority,
    Clock,
    IssuedCertificate,
    load_issued,
    utc_now,
)
from mesh.security.identity import WorkloadIdentity

log = logging.getLogger(__name__)

#: Istio renews at 80 % of the lifetime; renewing at 2/3 leaves a third of it to recover
#: from a CA that is briefly unreachable.
DEFAULT_RENEW_FRACTION = 2 / 3


class Issuer(Protocol):
    """Anything that signs certificates: :class:`mesh.security.ca.CertificateAuthority`."""

    def issue(
        self, identity: WorkloadIdentity, *, lifetime: dt.timedelta = ...
    ) -> IssuedCertificate: ...


class FileIssuer:
    """Serves the certificate files ``meshserve certs issue`` wrote, re-read at each renewal.

    For workloads that must not hold the CA key: whoever rotates the files (a cron job, an
    operator) rotates the served certificate, without a restart.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def issue(
        self, identity: WorkloadIdentity, *, lifetime: dt.timedelta = DEFAULT_WORKLOAD_LIFETIME
    ) -> IssuedCertificate:
        cert = load_issued(self.folder)
        if cert.identity != identity:
            raise InvalidArgument(
                f"{self.folder} holds a certificate for {cert.identity}, not {identity}"
            )
        return cert


class AddressedIssuer:
    """Issues from the CA in process with fixed DNS and IP SANs: the names and addresses
    peers dial this workload by (``mesh.security.ca.subject_alt_names``)."""

    def __init__(
        self, ca: CertificateAuthority, dns_names: Sequence[str], ip_addresses: Sequence[str]
    ) -> None:
        self.ca = ca
        self.dns_names = tuple(dns_names)
        self.ip_addresses = tuple(ip_addresses)

    def issue(
        self, identity: WorkloadIdentity, *, lifetime: dt.timedelta = DEFAULT_WORKLOAD_LIFETIME
    ) -> IssuedCertificate:
        return self.ca.issue(
            identity, lifetime=lifetime, dns_names=self.dns_names, ip_addresses=self.ip_addresses
        )


def server_certificate_configuration(
    cert: IssuedCertificate, *, require_client_auth: bool
) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(cert.key_pem, cert.cert_pem)],
        root_certificates=cert.ca_pem if require_client_auth else None,
    )


class CertificateSource:
    """The current certificate of one workload; reissued once ``renew_fraction`` of it is used.

    Renewal is lazy (on :meth:`current`) and can be forced with :meth:`refresh`. Servers get
    credentials from :meth:`server_credentials`: grpc asks this source for the configuration
    at every new TLS handshake, so a renewed certificate is presented to new connections
    while established ones carry on with the old one until they close. No connection drops.
    """

    def __init__(
        self,
        issuer: Issuer,
        identity: WorkloadIdentity,
        *,
        lifetime: dt.timedelta = DEFAULT_WORKLOAD_LIFETIME,
        renew_fraction: float = DEFAULT_RENEW_FRACTION,
        clock: Clock = utc_now,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise InvalidArgument(f"renew_fraction must be in (0, 1), got {renew_fraction}")
        self.identity = identity
        self._issuer = issuer
        self._lifetime = lifetime
        self._renew_fraction = renew_fraction
        self._clock = clock
        # grpc calls the certificate fetcher on its own threads, hence a lock, not asyncio.
        self._lock = threading.Lock()
        self._cert = issuer.issue(identity, lifetime=lifetime)
        self._listeners: list[Callable[[IssuedCertificate], None]] = []
        self._ssl: tuple[int, ssl.SSLContext] | None = None
        self._ssl_server: tuple[int, ssl.SSLContext] | None = None

    def renew_after(self, cert: IssuedCertificate) -> dt.datetime:
        return cert.not_before + (cert.not_after - cert.not_before) * self._renew_fraction

    def current(self) -> IssuedCertificate:
        """The certificate to present now, reissuing first when it is due."""
        with self._lock:
            cert = self._cert
            if self._clock() < self.renew_after(cert):
                return cert
        return self.refresh()

    def refresh(self) -> IssuedCertificate:
        """Reissues now, whatever the age of the current certificate."""
        fresh = self._issuer.issue(self.identity, lifetime=self._lifetime)
        with self._lock:
            old, self._cert = self._cert, fresh
            listeners = list(self._listeners)
        if fresh.serial == old.serial:
            return fresh  # a file issuer whose files have not been replaced yet
        log.info(
            "rotated the certificate of %s: serial %x -> %x, valid until %s",
            self.identity,
            old.serial,
            fresh.serial,
            fresh.not_after.isoformat(),
        )
        for listener in listeners:
            listener(fresh)
        return fresh

    def on_rotate(self, listener: Callable[[IssuedCertificate], None]) -> None:
        """Calls ``listener`` with each new certificate (e.g. to rebuild client channels)."""
        with self._lock:
            self._listeners.append(listener)

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Dynamic TLS server credentials that always present the current certificate.

        With ``require_client_auth`` (mutual TLS), clients must present a certificate signed
        by the mesh CA; grpc then exposes it in ``context.auth_context()``.
        """
        initial = self.current()
        served = [initial.serial]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by grpc before each handshake; None keeps the configuration it has.
            try:
                cert = self.current()
            except Exception:
                # A failed renewal must not fail the handshake: the old certificate is
                # still valid for a third of its lifetime.
                log.exception(
                    "certificate renewal for %s failed; serving the old one", self.identity
                )
                return None
            if cert.serial == served[0]:
                return None
            served[0] = cert.serial
            return server_certificate_configuration(cert, require_client_auth=require_client_auth)

        return grpc.dynamic_ssl_server_credentials(
            server_certificate_configuration(initial, require_client_auth=require_client_auth),
            # grpc accepts None ("keep the current one"); its stubs say otherwise.
            fetch,  # type: ignore[arg-type]
            require_client_authentication=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials presenting the current certificate and trusting the mesh CA.

        A channel keeps the credentials it was built with; callers that keep channels open
        for long rebuild them from :meth:`on_rotate`.
        """
        cert = self.current()
        return grpc.ssl_channel_credentials(
            root_certificates=cert.ca_pem,
            private_key=cert.key_pem,
            certificate_chain=cert.cert_pem,
        )

    def ssl_client_context(self) -> ssl.SSLContext:
        """The same client identity for plain asyncio connections (the gateway's HTTP/2
        relay): presents the current certificate, trusts the mesh CA, checks the server's
        name (an IP address or DNS name of its certificate) and offers HTTP/2 by ALPN.

        Built once per certificate, so each new connection after a rotation presents the
        new one, as new grpc channels do.
        """
        cert = self.current()
        cached = self._ssl
        if cached is not None and cached[0] == cert.serial:
            return cached[1]
        context = _ssl_context(ssl.PROTOCOL_TLS_CLIENT, cert)
        self._ssl = (cert.serial, context)
        return context

    def ssl_server_context(self) -> ssl.SSLContext:
        """A mutual-TLS listener for plain asyncio servers (the sidecar's HTTP/2 relay):
        presents the current certificate, requires a client certificate of the mesh CA and
        speaks HTTP/2 only (ALPN ``h2``, which gRPC clients require).

        An asyncio server keeps the context it was started with, so the context returned
        here swaps in the one of the current certificate during each handshake (the SNI
        callback, which OpenSSL runs for every ClientHello, with or without a server
        name): new connections after a rotation present the new certificate, established
        ones keep theirs, as with :meth:`server_credentials`.
        """
        context = self._server_context()

        def current(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            try:
                fresh = self._server_context()
            except Exception:  # a failed renewal must not fail the handshake
                log.exception(
                    "certificate renewal for %s failed; serving the old one", self.identity
                )
                return
            if connection.context is not fresh:
                connection.context = fresh

        context.sni_callback = current
        return context

    def _server_context(self) -> ssl.SSLContext:
        cert = self.current()
        cached = self._ssl_server
        if cached is not None and cached[0] == cert.serial:
            return cached[1]
        context = _ssl_context(ssl.PROTOCOL_TLS_SERVER, cert)
        context.verify_mode = ssl.CERT_REQUIRED
        self._ssl_server = (cert.serial, context)
        return context


def _ssl_context(protocol: ssl._SSLMethod, cert: IssuedCertificate) -> ssl.SSLContext:
    """A TLS 1.2+ context presenting ``cert``, trusting the mesh CA, offering HTTP/2."""
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=cert.ca_pem.decode())
    # The ssl module loads a key pair only from files: a private folder, gone at once.
    with tempfile.TemporaryDirectory(prefix="meshserve-tls-") as folder:
        chain, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        chain.write_bytes(cert.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(cert.key_pem)
        context.load_cert_chain(chain, key)
    context.set_alpn_protocols(["h2"])
    return context
