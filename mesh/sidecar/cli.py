"""``meshserve sidecar``: runs the sidecar of one worker until SIGTERM, then drains it."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from mesh.cli_args import port_number
from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.config.security import MTLS_MODES, MtlsMode
from mesh.config.snapshot import config_from_path
from mesh.security.ca import (
    CA_KEY_FILE,
    DEFAULT_CERTS_DIR,
    CertificateAuthority,
    load_issued,
    subject_alt_names,
    workload_folder,
)
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import AddressedIssuer, CertificateSource, FileIssuer
from mesh.server import eventloop
from mesh.server.sidecar_secret import read_secret
from mesh.sidecar.app import Sidecar, SidecarPolicies, SidecarSettings
from mesh.telemetry import logs
from mesh.telemetry.setup import Telemetry, TelemetrySettings, setup
from registry.connect import StoreSettings, add_store_arguments, settings_from_args
from registry.locate import resolve_url
from registry.store import open_store

log = logging.getLogger(__name__)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"labels are KEY=VALUE, got {text!r}")
    return key, value


def certificates(
    certs_dir: Path,
    namespace: str,
    service: str,
    lifetime: dt.timedelta,
    *,
    host: str = "127.0.0.1",
) -> CertificateSource:
    """With the CA key at hand, issue and rotate in process; else serve issued files.

    Issued in process, the certificate names ``host`` (the address this workload listens
    on and registers) and this machine's name: peers on other hosts verify the address they
    dial. Issued files carry whatever SANs their issuer gave them (``certs issue --ip``).
    """
    if (certs_dir / CA_KEY_FILE).exists():
        ca = CertificateAuthority.load(certs_dir)
        identity = WorkloadIdentity(ca.trust_domain, namespace, service)
        dns, ips = subject_alt_names(host, socket.gethostname())
        return CertificateSource(AddressedIssuer(ca, dns, ips), identity, lifetime=lifetime)
    # Without the CA key the trust domain comes from the issued certificate itself.
    folder = workload_folder(certs_dir, WorkloadIdentity("cluster.local", namespace, service))
    issued = load_issued(folder)
    return CertificateSource(FileIssuer(folder), issued.identity, lifetime=issued.lifetime)


@dataclass
class SidecarPlan:
    """Everything a sidecar needs, built from flags before anything starts."""

    settings: SidecarSettings
    policies: SidecarPolicies
    certificates: CertificateSource | None
    telemetry: Telemetry
    store: StoreSettings


def plan(args: argparse.Namespace, app_address: str, app_secret: str | None = None) -> SidecarPlan:
    """Validates flags into a plan; a bad flag or file fails here, before any process starts."""
    mtls: MtlsMode | None = args.mtls
    settings = SidecarSettings(
        service=args.service,
        app_address=app_address,
        host=args.host,
        port=args.port,
        instance_id=args.instance_id,
        namespace=args.namespace,
        labels=tuple(args.label),
        max_concurrency=args.max_concurrency or None,
        drain_delay=args.drain_delay,
        grace_seconds=args.grace,
        mtls=mtls,
        outbound_port=args.outbound_port,
        health_port=args.health_port,
        plaintext_port=args.plaintext_port,
        config_dir=args.config,
        app_secret=app_secret,
    )
    policies = SidecarPolicies()
    if args.config is not None:
        config = config_from_path(args.config)
        policies = SidecarPolicies(
            config.peer_authentications,
            config.authorization_policies,
            config.request_authentications,
        )
    certs = None
    if mtls != "DISABLE":
        certs = certificates(
            args.certs,
            args.namespace,
            args.service,
            dt.timedelta(hours=args.cert_hours),
            host=args.host,
        )
    store = settings_from_args(args, resolve_url(args))
    telemetry = setup(TelemetrySettings.from_env(service_name=f"sidecar/{args.service}"))
    logs.install(show_ids=telemetry.settings.traces != "none")
    return SidecarPlan(settings, policies, certs, telemetry, store)


@asynccontextmanager
async def running(plan: SidecarPlan) -> AsyncIterator[Sidecar]:
    """Opens the store and starts the sidecar; prints its one parseable line."""
    async with open_store(plan.store) as store:
        sidecar = Sidecar(
            plan.settings,
            store,
            certificates=plan.certificates,
            policies=plan.policies,
            telemetry=plan.telemetry,
        )
        serving = await sidecar.start()
        try:
            outbound = (
                f", outbound on {sidecar.outbound.address}" if sidecar.outbound is not None else ""
            )
            # One parseable line on stdout: scripts and tests read the bound port from it.
            print(
                f"sidecar listening on {serving.address} (mTLS {sidecar.mode}){outbound}",
                flush=True,
            )
            yield sidecar
        finally:
            await sidecar.drain()


def run(args: argparse.Namespace) -> int:
    secret = read_secret(args.app_secret_file) if args.app_secret_file else None
    sidecar_plan = plan(args, args.app, secret)

    async def main() -> None:
        async with running(sidecar_plan) as sidecar:
            await sidecar.run_until_signal()

    try:
        eventloop.run(main())
    finally:
        sidecar_plan.telemetry.shutdown()
    return 0


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``meshserve sidecar`` other than --service and --app (shared with run)."""
    parser.add_argument(
        "--port", type=port_number, default=0, help="inbound port (0: any free port)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="inbound address to listen on")
    parser.add_argument(
        "--outbound-port", type=port_number, help="localhost port for the worker's outgoing calls"
    )
    parser.add_argument(
        "--plaintext-port",
        type=port_number,
        help="PERMISSIVE: also serve callers outside the mesh in plaintext on this port",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        help="also answer gRPC health (only) in plaintext on this port: for the kubelet's "
        "readiness probe, which cannot do mutual TLS",
    )
    parser.add_argument("--instance-id", help="registry id (default <service>-<host>-<port>)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="the workload's namespace")
    parser.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="instance label (repeatable)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="mesh YAML: PeerAuthentication, AuthorizationPolicy, outbound routing",
    )
    parser.add_argument(
        "--mtls",
        choices=[m for m in MTLS_MODES if m != "UNSET"],
        help="override the PeerAuthentication mode",
    )
    parser.add_argument(
        "--certs",
        type=Path,
        default=DEFAULT_CERTS_DIR,
        help=f"certificate folder (default {DEFAULT_CERTS_DIR})",
    )
    parser.add_argument(
        "--cert-hours", type=float, default=24.0, help="lifetime of certificates issued in process"
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=1024, help="calls forwarded at once (0: no limit)"
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=2.0,
        help="seconds DRAINING is advertised before the port closes",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds in-flight calls may take to finish on drain",
    )
    add_store_arguments(parser)


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """``meshserve sidecar``'s worker flags (``meshserve run`` sets these itself)."""
    parser.add_argument(
        "--app", required=True, metavar="ADDRESS", help="the worker (host:port or unix:PATH)"
    )
    parser.add_argument(
        "--app-secret-file",
        type=Path,
        metavar="PATH",
        help="send the secret in this file with every call to the worker (the worker's "
        "--sidecar-secret-file): for a worker on a TCP port",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sidecar",
        help="run a worker's sidecar: registration, mTLS, authorization, outbound routing",
        description="Registers the worker at --app in the registry and mirrors its gRPC "
        "health there; accepts mesh calls on --port (mutual TLS, PeerAuthentication, "
        "AuthorizationPolicy, a concurrency limit) and forwards them to the worker; routes "
        "the worker's own calls from localhost:--outbound-port. SIGTERM drains.",
    )
    parser.add_argument("--service", required=True, help="the worker's service name")
    add_app_arguments(parser)
    add_sidecar_arguments(parser)
    parser.set_defaults(handler=run)
