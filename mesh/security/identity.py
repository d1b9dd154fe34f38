"""SPIFFE workload identities: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.errors import InvalidArgument

SCHEME = "spiffe://"
#: Istio's default trust domain; principals in AuthorizationPolicy are written under it.
DEFAULT_TRUST_DOMAIN = "cluster.local"

# SPIFFE ID spec: trust domain is lower-case letters, digits, '.', '-', '_';
# path segments are letters, digits, '.', '-', '_' and must not be '.' or '..'.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def check_trust_domain(trust_domain: str) -> str:
    """Returns ``trust_domain`` or raises naming why it is not a SPIFFE trust domain."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain) or len(trust_domain) > 255:
        raise InvalidArgument(
            f"trust domain {trust_domain!r} must be 1-255 lower-case letters, digits, '.', '-', '_'"
        )
    return trust_domain


def _check_segment(what: str, value: str) -> str:
    if not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise InvalidArgument(
            f"{what} {value!r} must be letters, digits, '.', '-', '_' (not '.' or '..')"
        )
    return value


@dataclass(frozen=True, order=True)
class WorkloadIdentity:
    """Who a workload is: the Istio/Kubernetes service-account form of a SPIFFE id."""

    trust_domain: str
    namespace: str
    service: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service", self.service)

    @property
    def uri(self) -> str:
        """The SPIFFE id carried as the certificate's URI SAN."""
        return f"{SCHEME}{self.principal}"

    @property
    def principal(self) -> str:
        """Istio's principal form (no scheme), as AuthorizationPolicy ``principals`` name it."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, spiffe_id: str) -> WorkloadIdentity:
        """Parses a SPIFFE id, rejecting anything that is not exactly ``/ns/<ns>/sa/<sa>``."""
        if not spiffe_id.startswith(SCHEME):
            raise InvalidArgument(f"SPIFFE id {spiffe_id!r} must start with {SCHEME!r}")
        rest = spiffe_id[len(SCHEME) :]
        if any(c in rest for c in "?#%") or rest != rest.strip():
            raise InvalidArgument(
                f"SPIFFE id {spiffe_id!r} must not carry a query, fragment, escapes or spaces"
            )
        trust_domain, _, path = rest.partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise InvalidArgument(
                f"SPIFFE id {spiffe_id!r} must have the path /ns/<namespace>/sa/<service>"
            )
        return cls(check_trust_domain(trust_domain), parts[1], parts[3])
