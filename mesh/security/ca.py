"""The mesh certificate authority: a self-signed EC P-256 root that issues SPIFFE workload certs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from mesh.security.identity import SCHEME, WorkloadIdentity, check_trust_domain

Clock = Callable[[], dt.datetime]

DEFAULT_CERTS_DIR = Path(".meshserve/certs")
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
DEFAULT_CA_LIFETIME = dt.timedelta(days=3650)
DEFAULT_WORKLOAD_LIFETIME = dt.timedelta(hours=24)
#: Certificates start this far in the past so peers with slightly slow clocks accept them.
CLOCK_SKEW = dt.timedelta(minutes=1)
DEFAULT_DNS_NAMES = ("localhost",)
DEFAULT_IP_ADDRESSES = ("127.0.0.1",)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same folder, then renames.

    The temporary file is created with ``mode`` from the start, so a private key is never
    readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class IssuedCertificate:
    """A workload's certificate, its private key and the CA that vouches for it (all PEM)."""

    identity: WorkloadIdentity
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def save(self, folder: Path) -> None:
        """Writes ``cert.pem`` (leaf), ``key.pem`` (0600) and ``ca.pem`` into ``folder``."""
        write_atomic(folder / KEY_FILE, self.key_pem, mode=0o600)
        write_atomic(folder / CERT_FILE, self.cert_pem)
        write_atomic(folder / CA_CERT_FILE, self.ca_pem)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The certificate's ``spiffe://`` URI SANs."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(SCHEME)
    ]


def workload_identity(cert: x509.Certificate) -> WorkloadIdentity:
    """The one SPIFFE identity a workload certificate carries (SPIFFE allows exactly one)."""
    ids = spiffe_ids(cert)
    if len(ids) != 1:
        raise InvalidArgument(f"a workload certificate carries one SPIFFE id, found {len(ids)}")
    return WorkloadIdentity.parse(ids[0])


class CertificateAuthority:
    """Signs workload certificates for one trust domain.

    The trust domain is written into the root itself (a ``spiffe://<td>`` URI SAN, as the
    SPIFFE X.509 spec allows for signing certificates), so a loaded CA knows it.
    """

    def __init__(
        self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, clock: Clock = utc_now
    ) -> None:
        self.cert = cert
        self._key = key
        self._clock = clock
        ids = spiffe_ids(cert)
        if len(ids) != 1 or "/" in ids[0][len(SCHEME) :]:
            raise InvalidArgument("the CA certificate must carry one spiffe://<trust-domain> URI")
        self.trust_domain = check_trust_domain(ids[0][len(SCHEME) :])

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        lifetime: dt.timedelta = DEFAULT_CA_LIFETIME,
        clock: Clock = utc_now,
    ) -> CertificateAuthority:
        check_trust_domain(trust_domain)
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshserve root CA ({trust_domain})"),
            ]
        )
        now = clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"{SCHEME}{trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, clock=clock)

    def save(self, folder: Path) -> None:
        write_atomic(folder / CA_KEY_FILE, _key_pem(self._key), mode=0o600)
        write_atomic(folder / CA_CERT_FILE, self.cert_pem)

    @classmethod
    def load(cls, folder: Path, *, clock: Clock = utc_now) -> CertificateAuthority:
        cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
        if not cert_path.exists() or not key_path.exists():
            raise NotFound(f"no mesh CA in {folder} (run `meshserve certs init` first)")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"{key_path}: the CA key must be an EC key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise InvalidArgument(f"{key_path} does not belong to {cert_path}")
        return cls(cert, key, clock=clock)

    def issue(
        self,
        identity: WorkloadIdentity,
        *,
        lifetime: dt.timedelta = DEFAULT_WORKLOAD_LIFETIME,
        dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
        ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
    ) -> IssuedCertificate:
        """A fresh key and a leaf certificate for ``identity``, valid for ``lifetime``.

        The DNS/IP SANs let a plain gRPC client verify the server by the address it dialled
        (``localhost``, ``127.0.0.1``); mesh peers verify the SPIFFE URI instead.
        """
        if identity.trust_domain != self.trust_domain:
            raise InvalidArgument(
                f"this CA signs for trust domain {self.trust_domain!r}, not "
                f"{identity.trust_domain!r}"
            )
        if lifetime <= dt.timedelta(0):
            raise InvalidArgument(f"certificate lifetime must be positive, got {lifetime}")
        now = self._clock()
        not_after = now + lifetime
        if not_after > self.cert.not_valid_after_utc:
            raise FailedPrecondition(
                f"the CA expires at {self.cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z, before the "
                f"requested certificate would; renew the CA"
            )
        try:
            ips = [ipaddress.ip_address(a) for a in ip_addresses]
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        key = _new_key()
        serial = x509.random_serial_number()
        not_before = now - CLOCK_SKEW
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.service),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                # SPIFFE requires the URI SAN; critical only when the subject is empty.
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(identity.uri),
                        *(x509.DNSName(n) for n in dns_names),
                        *(x509.IPAddress(ip) for ip in ips),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            identity=identity,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
            ca_pem=self.cert_pem,
            serial=serial,
            not_before=not_before,
            not_after=not_after,
        )


def subject_alt_names(host: str, hostname: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The DNS and IP SANs of a workload that listens on ``host`` on machine ``hostname``.

    Peers verify the name they dialled (the gateway dials the address a sidecar registered:
    its host's IP), so a workload on another host than its callers needs that address in its
    certificate, besides the loopback names local callers use. A wildcard bind address
    (``0.0.0.0``) names no host and adds nothing.
    """
    dns = [*DEFAULT_DNS_NAMES]
    ips = [*DEFAULT_IP_ADDRESSES]
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host and host not in dns:
            dns.append(host)  # a DNS name to bind on is the name callers dial
    else:
        if not address.is_unspecified and str(address) not in ips:
            ips.append(str(address))
    if hostname and hostname not in dns:
        dns.append(hostname)
    return tuple(dns), tuple(ips)


def workload_folder(certs_dir: Path, identity: WorkloadIdentity) -> Path:
    """Where ``meshserve certs issue`` writes a workload's files."""
    return certs_dir / identity.namespace / identity.service


def load_issued(folder: Path) -> IssuedCertificate:
    """Reads a workload's ``cert.pem``/``key.pem``/``ca.pem`` as written by :meth:`save`."""
    paths = [folder / CERT_FILE, folder / KEY_FILE, folder / CA_CERT_FILE]
    for p in paths:
        if not p.exists():
            raise NotFound(f"{p} does not exist (run `meshserve certs issue` first)")
    cert_pem, key_pem, ca_pem = (p.read_bytes() for p in paths)
    cert = x509.load_pem_x509_certificate(cert_pem)
    return IssuedCertificate(
        identity=workload_identity(cert),
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pem=ca_pem,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
