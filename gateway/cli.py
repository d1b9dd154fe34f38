"""``meshserve gateway``: runs the ingress proxy."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
from pathlib import Path

from gateway.app import DEFAULT_PORT, Gateway
from gateway.auth import AuthConfig, ClientGuard
from mesh.balance.locality import Locality
from mesh.cli_args import port_number
from mesh.cli_error import CliError
from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.config.views import DEFAULT_INGRESS_LABELS
from mesh.routing.discovery import DiscoverySource, StaticDiscovery, parse_static
from mesh.routing.limits import RelayLimits
from mesh.routing.pipeline import validate_documents
from mesh.routing.state import GatewayState
from mesh.server import eventloop
from mesh.server.app import ServerSettings, serve_until_signal
from mesh.sidecar.cli import certificates
from mesh.telemetry import logs
from mesh.telemetry.setup import TelemetrySettings, setup
from registry.config_store import ConfigStore
from registry.connect import add_store_arguments, settings_from_args
from registry.discovery import RegistryDiscovery
from registry.locate import resolve_url
from registry.store import open_store

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run the gateway: routes gRPC calls to workers by Istio-style YAML",
        description="Routes every mesh gRPC call to a worker (consistent hash on model version, "
        "retries, outlier detection), configured by the YAML files in --config, which are "
        "reloaded when they change. With the registry (--es), the latest version in its "
        "config store ('routing') is applied over them, and `meshserve config apply` writes "
        "there.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help="port to listen on (0: any free port)",
    )
    parser.add_argument(
        "--labels",
        type=_labels,
        default=DEFAULT_INGRESS_LABELS,
        metavar="KEY=VALUE[,KEY=VALUE...]",
        help="this ingress' labels, which Gateway, AuthorizationPolicy and RequestAuthentication "
        "selectors match (default: "
        + ",".join(f"{k}={v}" for k, v in DEFAULT_INGRESS_LABELS)
        + ", so copied Istio Gateways select it)",
    )
    parser.add_argument(
        "--service-port",
        type=int,
        default=None,
        metavar="N",
        help="the port clients reach this ingress on, which a Gateway server's port.number "
        f"names (a Kubernetes Service port in front of it); default: --port, or {DEFAULT_PORT} "
        "when --port is 0",
    )
    parser.add_argument("--config", type=Path, help="directory (or file) of routing YAML")
    parser.add_argument(
        "--static",
        action="append",
        default=[],
        metavar="SERVICE=HOST:PORT[,LABEL=VALUE...]",
        help="a fixed endpoint instead of registry discovery (repeatable)",
    )
    parser.add_argument(
        "--certs",
        type=Path,
        help="certificate folder (`meshserve certs init`): mutual TLS to the sidecars",
    )
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="the gateway's namespace (its identity)"
    )
    parser.add_argument(
        "--auth-config",
        type=Path,
        metavar="FILE",
        help="client authentication and rate limits (YAML, see gateway/auth.py and docs/security.md)",
    )
    parser.add_argument(
        "--reload-interval", type=float, default=1.0, help="seconds between config directory checks"
    )
    parser.add_argument(
        "--locality",
        type=_locality,
        metavar="REGION[/ZONE[/SUBZONE]]",
        help="the gateway's locality, for DestinationRule localityLbSetting (default: "
        "unknown, so every endpoint is alike)",
    )
    limits = parser.add_argument_group(
        "relay timeouts and limits",
        "Envoy's semantics (docs/gateway.md); seconds for timeouts, 0 turns one off",
    )
    defaults = RelayLimits()
    for name, kind, help_text in _LIMIT_FLAGS:
        limits.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=getattr(defaults, name),
            metavar="N",
            help=f"{help_text} (default {getattr(defaults, name):g})",
        )
    add_store_arguments(parser)
    parser.set_defaults(handler=run)


#: RelayLimits fields exposed as flags: (field, type, help).
_LIMIT_FLAGS: tuple[tuple[str, type[float] | type[int], str], ...] = (
    ("request_headers_timeout", float, "seconds a new connection has to send request headers"),
    ("stream_idle_timeout", float, "a stream with no frames for this long is ended"),
    ("idle_timeout", float, "a connection with no streams for this long is closed"),
    ("max_connection_duration", float, "connections this old get a graceful GOAWAY"),
    ("max_connections_per_source", int, "connections one client address may hold"),
    ("max_streams_per_source", int, "open streams one client address may hold"),
    ("max_streams", int, "open streams in all"),
    ("abuse_cool_off", float, "seconds a client closed for abuse is refused"),
    (
        "max_source_share",
        float,
        "the most of a destination's http2MaxRequests one client address may hold, 0-1",
    ),
)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        pairs.append((key, value))
    return tuple(sorted(pairs))


def _locality(text: str) -> Locality:
    try:
        return Locality.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def limits_from_args(args: argparse.Namespace) -> RelayLimits:
    try:
        return RelayLimits(**{name: getattr(args, name) for name, _, _ in _LIMIT_FLAGS})
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    try:
        instances = [parse_static(spec) for spec in args.static]
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    settings = ServerSettings(host=args.host, port=args.port)
    relay_limits = limits_from_args(args)
    telemetry = setup(TelemetrySettings.from_env(service_name="gateway"))
    logs.install(show_ids=telemetry.settings.traces != "none")
    traced = telemetry.settings.traces != "none" or bool(telemetry.settings.metrics)
    guard = None
    if args.auth_config is not None:
        # Loaded before serving: a bad file is a one-line error, not a half-open gateway.
        guard = ClientGuard(AuthConfig.load(args.auth_config))
    tls_context = None
    channel_credentials = None
    if args.certs is not None:
        # Mutual TLS to the sidecars, as the mesh identity of the gateway (the relay's
        # upstream connections).
        source = certificates(
            args.certs, args.namespace, "gateway", dt.timedelta(hours=24), host=args.host
        )
        tls_context = source.ssl_client_context
        # The same identity for the gateway's own calls to every worker (gateway/fleet.py).
        channel_credentials = source.channel_credentials
    store_settings = None if instances else settings_from_args(args, resolve_url(args))

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            discovery: DiscoverySource
            config_store: ConfigStore | None = None
            if store_settings is None:
                discovery = StaticDiscovery(instances)
            else:
                store = await stack.enter_async_context(open_store(store_settings))
                discovery = RegistryDiscovery(store.watcher())
                config_store = store.config(validator=validate_documents)
            gateway = Gateway(
                discovery,
                config_dir=args.config,
                reload_interval=args.reload_interval,
                metrics=telemetry.metrics if telemetry.settings.metrics else None,
                config_store=config_store,
                tls_context=tls_context,
                channel_credentials=channel_credentials,
                telemetry=telemetry if traced else None,
                guard=guard,
                relay_limits=relay_limits,
                state=GatewayState(locality=args.locality),
                labels=args.labels,
                service_port=args.service_port,
            )
            serving = await gateway.start(settings)
            # One parseable line on stdout: scripts and tests read the bound port from it.
            print(
                f"gateway listening on {serving.address} "
                f"(config version {gateway.state.config.version})",
                flush=True,
            )
            await serve_until_signal(serving)

    try:
        eventloop.run(main())
    finally:
        telemetry.shutdown()
    return 0
