"""``meshserve certs init|issue|show``: the mesh CA and workload certificates on disk."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from rich.console import Console
from rich.table import Table

from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.errors import AlreadyExists, InvalidArgument, NotFound
from mesh.security.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_FILE,
    DEFAULT_CERTS_DIR,
    DEFAULT_DNS_NAMES,
    DEFAULT_IP_ADDRESSES,
    CertificateAuthority,
    spiffe_ids,
    workload_folder,
)
from mesh.security.identity import DEFAULT_TRUST_DOMAIN, WorkloadIdentity

out = Console()


def cmd_init(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    if (folder / CA_KEY_FILE).exists() and not args.force:
        raise AlreadyExists(
            f"{folder} already holds a mesh CA; --force replaces it (every issued "
            "certificate then stops being trusted)"
        )
    ca = CertificateAuthority.create(args.trust_domain, lifetime=dt.timedelta(days=args.days))
    ca.save(folder)
    out.print(
        f"mesh CA for trust domain [bold]{ca.trust_domain}[/] in {folder} "
        f"(serial {ca.cert.serial_number:x}, valid until {ca.cert.not_valid_after_utc:%Y-%m-%d})",
        highlight=False,
    )
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.dir)
    identity = WorkloadIdentity(ca.trust_domain, args.namespace, args.service)
    issued = ca.issue(
        identity,
        lifetime=dt.timedelta(hours=args.hours),
        dns_names=args.dns or DEFAULT_DNS_NAMES,
        ip_addresses=args.ip or DEFAULT_IP_ADDRESSES,
    )
    folder = args.out or workload_folder(args.dir, identity)
    issued.save(folder)
    out.print(
        f"{identity.uri} -> {folder} (serial {issued.serial:x}, "
        f"valid until {issued.not_after:%Y-%m-%d %H:%M}Z)",
        highlight=False,
    )
    return 0


def _describe(path: Path) -> tuple[str, str, str, str, str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ids = ", ".join(spiffe_ids(cert)) or "-"
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    state = "EXPIRED" if left.total_seconds() <= 0 else f"{left.total_seconds() / 3600:.1f} h left"
    return (str(path), "CA" if ca else "workload", ids, f"{cert.serial_number:x}", state)


def cmd_show(args: argparse.Namespace) -> int:
    paths: list[Path] = args.paths or sorted(
        p
        for p in args.dir.rglob("*.pem")
        if p.name == CERT_FILE or (p.name == CA_CERT_FILE and p.parent == args.dir)
    )
    if not paths:
        raise NotFound(f"no certificates under {args.dir} (run `meshserve certs init`)")
    table = Table("file", "kind", "SPIFFE id", "serial", "expires")
    for column in table.columns:
        column.overflow = "fold"
    for path in paths:
        try:
            table.add_row(*_describe(path))
        except ValueError as exc:
            raise InvalidArgument(f"{path}: not a PEM certificate ({exc})") from exc
    out.print(table)
    return 0


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = subparsers.add_parser("certs", help="the mesh CA and workload certificates")
    sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            type=Path,
            default=DEFAULT_CERTS_DIR,
            help=f"certificate folder (default {DEFAULT_CERTS_DIR})",
        )

    init = sub.add_parser("init", help="create the mesh CA (EC P-256, self-signed)")
    common(init)
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    init.add_argument("--days", type=_positive(int), default=3650, help="CA lifetime in days")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(handler=cmd_init)

    issue = sub.add_parser("issue", help="issue a workload certificate with a SPIFFE identity")
    common(issue)
    issue.add_argument("--service", required=True, help="the service (SPIFFE 'sa' segment)")
    issue.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    issue.add_argument("--hours", type=_positive(float), default=24.0, help="lifetime in hours")
    issue.add_argument("--dns", action="append", help="DNS SAN (repeatable; default localhost)")
    issue.add_argument("--ip", action="append", help="IP SAN (repeatable; default 127.0.0.1)")
    issue.add_argument(
        "--out", type=Path, help="output folder (default <dir>/<namespace>/<service>)"
    )
    issue.set_defaults(handler=cmd_issue)

    show = sub.add_parser("show", help="list certificates with identity, serial and expiry")
    common(show)
    show.add_argument("paths", nargs="*", type=Path, help="PEM files (default: all under --dir)")
    show.set_defaults(handler=cmd_show)
