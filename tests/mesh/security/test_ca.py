"""The mesh CA: certificate shapes, SPIFFE ids, files on disk."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from mesh.security.ca import (
    CertificateAuthority,
    load_issued,
    subject_alt_names,
    workload_folder,
    workload_identity,
)
from mesh.security.identity import WorkloadIdentity
from mesh.sidecar.cli import certificates

ID = WorkloadIdentity("cluster.local", "meshserve", "inference")


def test_ca_certificate_can_only_sign() -> None:
    ca = CertificateAuthority.create("cluster.local")
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert bc.critical and bc.value.ca
    assert ku.key_cert_sign and not ku.digital_signature
    assert isinstance(ca.cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_workload_certificate_carries_spiffe_id_sans_and_both_usages() -> None:
    ca = CertificateAuthority.create("cluster.local")
    issued = ca.issue(ID, lifetime=dt.timedelta(hours=2))
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/meshserve/sa/inference"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.serial_number == issued.serial
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=2, minutes=1)
    assert workload_identity(cert) == ID
    cert.verify_directly_issued_by(ca.cert)


def test_ca_refuses_other_trust_domains_and_outliving_itself() -> None:
    ca = CertificateAuthority.create("cluster.local", lifetime=dt.timedelta(days=1))
    with pytest.raises(InvalidArgument, match=r"trust domain 'cluster\.local', not 'other\.org'"):
        ca.issue(WorkloadIdentity("other.org", "ns", "svc"))
    with pytest.raises(FailedPrecondition, match="renew the CA"):
        ca.issue(ID, lifetime=dt.timedelta(days=2))
    with pytest.raises(InvalidArgument, match="must be positive"):
        ca.issue(ID, lifetime=dt.timedelta(0))


def test_save_and_load_round_trip_with_private_keys_0600(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("example.org")
    ca.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.trust_domain == "example.org"
    issued = loaded.issue(WorkloadIdentity("example.org", "ns", "svc"))
    folder = workload_folder(tmp_path, issued.identity)
    issued.save(folder)
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
    back = load_issued(folder)
    assert back.serial == issued.serial and back.identity == issued.identity
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_load_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="meshserve certs init"):
        CertificateAuthority.load(tmp_path)


@pytest.mark.parametrize(
    ("spiffe_id", "problem"),
    [
        ("cluster.local/ns/a/sa/b", "must start with"),
        ("spiffe://cluster.local/ns/a", "/ns/<namespace>/sa/<service>"),
        ("spiffe://cluster.local/ns/a/sa/b/c", "/ns/<namespace>/sa/<service>"),
        ("spiffe://cluster.local/sa/a/ns/b", "/ns/<namespace>/sa/<service>"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
        ("spiffe:///ns/a/sa/b", "trust domain"),
        ("spiffe://td/ns/../sa/b", "namespace"),
        ("spiffe://td/ns/a/sa/", "service"),
        ("spiffe://td/ns/a/sa/b?x=1", "query"),
        ("spiffe://td/ns/a%2f/sa/b", "escapes"),
    ],
)
def test_identity_parser_rejects_malformed_ids(spiffe_id: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        WorkloadIdentity.parse(spiffe_id)


def test_identity_parser_round_trips() -> None:
    parsed = WorkloadIdentity.parse("spiffe://cluster.local/ns/default/sa/data-worker")
    assert parsed == WorkloadIdentity("cluster.local", "default", "data-worker")
    assert parsed.principal == "cluster.local/ns/default/sa/data-worker"
    assert str(parsed) == "spiffe://cluster.local/ns/default/sa/data-worker"


@pytest.mark.parametrize(
    ("host", "dns", "ips"),
    [
        ("127.0.0.1", ("localhost", "node-1"), ("127.0.0.1",)),
        ("10.77.0.3", ("localhost", "node-1"), ("127.0.0.1", "10.77.0.3")),
        ("0.0.0.0", ("localhost", "node-1"), ("127.0.0.1",)),
        ("[fd00::3]", ("localhost", "node-1"), ("127.0.0.1", "fd00::3")),
        ("gateway.mesh.test", ("localhost", "gateway.mesh.test", "node-1"), ("127.0.0.1",)),
    ],
)
def test_subject_alt_names_carry_the_address_peers_dial(
    host: str, dns: tuple[str, ...], ips: tuple[str, ...]
) -> None:
    assert subject_alt_names(host, "node-1") == (dns, ips)


def test_a_sidecar_on_another_host_gets_its_address_in_its_certificate(tmp_path: Path) -> None:
    CertificateAuthority.create("cluster.local").save(tmp_path)
    source = certificates(
        tmp_path, "meshserve", "inference", dt.timedelta(hours=1), host="10.77.0.3"
    )
    cert = x509.load_pem_x509_certificate(source.current().cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.77.0.3"]
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    # Renewals keep the addresses.
    renewed = x509.load_pem_x509_certificate(source.refresh().cert_pem)
    assert renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == san
