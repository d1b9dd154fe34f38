"""PeerAuthentication: which mTLS mode a workload's port runs, and whether a connection passes."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import grpc.aio

from mesh.config.security import MtlsMode, PeerAuthentication
from mesh.errors import InvalidArgument, Unauthenticated
from mesh.security.identity import SCHEME, WorkloadIdentity
from mesh.security.rotation import CertificateSource
from mesh.security.workload import ROOT_NAMESPACE, Workload, is_root

#: Istio's default when no policy says otherwise.
DEFAULT_MODE: MtlsMode = "PERMISSIVE"

Transport = Literal["mtls", "tls", "plaintext"]


@dataclass(frozen=True)
class ResolvedMode:
    """The mode in force for one workload port, and which resource set it (for explaining)."""

    mode: MtlsMode
    source: str


def _pick(policies: Sequence[PeerAuthentication]) -> PeerAuthentication | None:
    # Istio takes the oldest of several; files have no age, so the first by name, stably.
    return min(policies, key=lambda p: p.metadata.name) if policies else None


def resolve_mode(
    policies: Sequence[PeerAuthentication],
    workload: Workload,
    port: int | None = None,
    *,
    root_namespace: str = ROOT_NAMESPACE,
) -> ResolvedMode:
    """Istio's precedence: workload (selector) > namespace > mesh-wide (root namespace).

    A port-level mode on the workload policy beats its workload mode; ``UNSET`` at any level
    inherits from the next one; nothing at all means PERMISSIVE.
    """
    selected = [
        p
        for p in policies
        if p.selector
        and p.metadata.namespace == workload.namespace
        and workload.selected_by(p.selector)
    ]
    levels = [
        _pick(selected),
        _pick(
            [p for p in policies if not p.selector and p.metadata.namespace == workload.namespace]
        ),
        _pick(
            [
                p
                for p in policies
                if not p.selector and is_root(p.metadata.namespace, root_namespace)
            ]
        ),
    ]
    for i, policy in enumerate(levels):
        if policy is None:
            continue
        if i == 0 and port is not None:
            port_mode = dict(policy.port_modes).get(port)
            if port_mode not in (None, "UNSET"):
                assert port_mode is not None
                return ResolvedMode(port_mode, f"{policy.ref} port {port}")
        if policy.mode != "UNSET":
            return ResolvedMode(policy.mode, policy.ref)
    return ResolvedMode(DEFAULT_MODE, "default")


def listeners_for(mode: MtlsMode) -> tuple[Transport, ...]:
    """The listeners a workload port in ``mode`` needs, the first on the port itself.

    gRPC cannot tell TLS from plaintext on one socket, and grpc Python cannot ask for an
    *optional* client certificate (TLS without a required client certificate never learns
    the caller's identity). So PERMISSIVE is two listeners: mutual TLS on the port, where
    mesh peers are identified, and a plaintext one beside it for callers outside the mesh,
    who are accepted anonymously. STRICT is mutual TLS only; DISABLE plaintext only.
    """
    if mode == "STRICT":
        return ("mtls",)
    if mode == "DISABLE":
        return ("plaintext",)
    return ("mtls", "plaintext")


def server_credentials(mode: MtlsMode, source: CertificateSource) -> grpc.ServerCredentials | None:
    """Credentials for the main listener of a port in ``mode``; None: plaintext."""
    if listeners_for(mode)[0] == "plaintext":
        return None
    return source.server_credentials(require_client_auth=True)


@dataclass(frozen=True)
class PeerInfo:
    """What the transport proved about the caller."""

    #: The connection is TLS.
    tls: bool = False
    #: The caller presented a certificate that the mesh CA verified.
    verified: bool = False
    #: Its SPIFFE id (``spiffe://td/ns/x/sa/y``), when it presented a well-formed one.
    spiffe_id: str | None = None

    @property
    def identity(self) -> WorkloadIdentity | None:
        if self.spiffe_id is None:
            return None
        return WorkloadIdentity.parse(self.spiffe_id)

    @property
    def principal(self) -> str | None:
        """Istio's principal form, as AuthorizationPolicy matches it."""
        return None if self.spiffe_id is None else self.spiffe_id[len(SCHEME) :]


def peer_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> PeerInfo:
    """Reads a grpc auth context; grpc only fills the x509 fields for a verified chain."""
    tls = list(auth.get("transport_security_type", ())) == [b"ssl"]
    verified = tls and bool(list(auth.get("x509_pem_cert", ())))
    ids = [v.decode() for v in auth.get("peer_spiffe_id", [])]
    if not ids:
        ids = [
            v.decode()
            for v in auth.get("x509_subject_alternative_name", [])
            if v.startswith(SCHEME.encode())
        ]
    spiffe_id = None
    if verified and len(ids) == 1:
        try:
            spiffe_id = WorkloadIdentity.parse(ids[0]).uri
        except InvalidArgument:
            spiffe_id = None
    return PeerInfo(tls=tls, verified=verified, spiffe_id=spiffe_id)


def peer_from_context(context: grpc.aio.ServicerContext[Any, Any]) -> PeerInfo:
    return peer_from_auth_context(context.auth_context())


def peer_from_ssl(ssl_object: ssl.SSLObject | None) -> PeerInfo:
    """Reads a Python TLS connection (the relay's); None: plaintext.

    ``getpeercert()`` is empty unless the peer's chain was verified, and the relay's
    listeners require a certificate of the mesh CA, so a certificate here is a verified one.
    """
    if ssl_object is None:
        return PeerInfo()
    cert = ssl_object.getpeercert()
    if not cert:
        return PeerInfo(tls=True)
    names: Any = cert.get("subjectAltName", ())  # ((kind, value), ...); typeshed's union
    ids = [v for kind, v in names if kind == "URI" and str(v).startswith(SCHEME)]
    spiffe_id = None
    if len(ids) == 1:
        try:
            spiffe_id = WorkloadIdentity.parse(ids[0]).uri
        except InvalidArgument:
            spiffe_id = None
    return PeerInfo(tls=True, verified=True, spiffe_id=spiffe_id)


@dataclass(frozen=True)
class PeerDecision:
    accepted: bool
    reason: str


def decide(mode: MtlsMode, peer: PeerInfo) -> PeerDecision:
    """Whether a call on a connection like ``peer`` may proceed under ``mode`` (pure)."""
    if mode == "STRICT":
        if not peer.tls:
            return PeerDecision(False, "mTLS is STRICT: plaintext connections are refused")
        if not peer.verified:
            return PeerDecision(
                False, "mTLS is STRICT: the client presented no certificate of the mesh CA"
            )
        if peer.spiffe_id is None:
            return PeerDecision(
                False, "mTLS is STRICT: the client certificate carries no valid SPIFFE id"
            )
        return PeerDecision(True, f"mTLS peer {peer.spiffe_id}")
    if mode == "DISABLE":
        return PeerDecision(True, "mTLS is DISABLEd")
    if peer.spiffe_id is not None:
        return PeerDecision(True, f"mTLS peer {peer.spiffe_id}")
    return PeerDecision(True, f"mTLS is {mode}: anonymous peer accepted")


def check_peer(mode: MtlsMode, peer: PeerInfo) -> None:
    """Raises :class:`Unauthenticated` naming why, when ``mode`` refuses ``peer``."""
    verdict = decide(mode, peer)
    if not verdict.accepted:
        raise Unauthenticated(verdict.reason)
