"""Assembles a sidecar: the relay's inbound mode, registration, health mirroring, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc.aio

from mesh.balance.endpoints import endpoint_from_instance
from mesh.balance.locality import own_locality
from mesh.balance.preload import Version
from mesh.config.fields import ConfigError
from mesh.config.loader import fingerprint
from mesh.config.request_authn import RequestAuthentication
from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.config.security import AuthorizationPolicy, MtlsMode, PeerAuthentication
from mesh.config.snapshot import config_from_path
from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.proxy.inbound import ConcurrencyLimit, Inbound
from mesh.proxy.relay import Relay
from mesh.routing.limits import RelayLimits
from mesh.routing.ownership import owned_versions
from mesh.routing.pipeline import ConfigPipeline, validate_documents
from mesh.routing.state import GatewayState
from mesh.security.authz import Authorizer, RequestAttributes
from mesh.security.peer import PeerInfo, check_peer, listeners_for, resolve_mode
from mesh.security.request_authn import RequestAuthenticator
from mesh.security.rotation import CertificateSource
from mesh.security.workload import Workload
from mesh.server.app import ServerSettings, Service, Serving, start_server
from mesh.server.health_port import serve_health_port
from mesh.server.private import PrivateSocket
from mesh.server.sidecar_secret import HEADER as SECRET_HEADER
from mesh.sidecar.health import HealthMirror
from mesh.sidecar.liveness import Hung, Liveness
from mesh.sidecar.load import LoadProbe, model_refs, registry_load
from mesh.sidecar.outbound import Outbound
from mesh.sidecar.preload import send_preload
from mesh.telemetry.interceptors import TelemetryServerInterceptor
from mesh.telemetry.setup import Telemetry
from registry.discovery import RegisteredInstance, RegistryDiscovery
from registry.instances import Instance, Status
from registry.lease import Registration
from registry.store import Store

log = logging.getLogger(__name__)
#: The inbound relay's limits: the edge's, but no abuse cool-off. A sidecar's callers are
#: mesh peers over mTLS, and one gateway connection multiplexes many clients: a client's
#: rapid reset relayed through it may still get that connection a GOAWAY, but locking the
#: gateway's address out for a while would cut every client off this worker. (The
#: per-source share of http2MaxRequests applies where calls are routed: not here.)
INBOUND_LIMITS = RelayLimits(abuse_cool_off=0.0, max_source_share=0.0)

#: Matches the gateway's service names (``mesh.routing.services``): the inbound service.
INBOUND_SERVICE = "meshserve.sidecar.Inbound"


@dataclass(frozen=True)
class SidecarSettings:
    """One sidecar: whom it fronts and how. Validated on construction."""

    service: str
    app_address: str
    host: str = "127.0.0.1"
    port: int = 0
    instance_id: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    labels: tuple[tuple[str, str], ...] = ()
    #: Calls forwarded at once; more are refused with RESOURCE_EXHAUSTED (None: no limit).
    max_concurrency: int | None = 1024
    #: How long DRAINING is advertised, still serving, before the server stops taking calls:
    #: long enough for every gateway's watch (1 s) to stop routing here.
    drain_delay: float = 2.0
    #: How long in-flight calls may take to finish once the server stops taking new ones.
    grace_seconds: float = 10.0
    #: The mTLS mode; None: resolved from the PeerAuthentication policies.
    mtls: MtlsMode | None = None
    heartbeat_interval: float = 1.0
    lease_ttl: float = 5.0
    #: PERMISSIVE only: a second, plaintext listener for callers outside the mesh.
    plaintext_port: int | None = None
    #: Where the worker's outgoing calls enter (localhost only); None: no outbound.
    outbound_port: int | None = None
    #: A plaintext listener that answers gRPC health only (the sidecar's, which follows the
    #: worker's): for probes that cannot present a mesh certificate, such as the kubelet's
    #: ``grpc`` readiness probe (Istio's pilot-agent serves 15021 for the same reason).
    #: None: none.
    health_port: int | None = None
    #: Routing YAML for outbound calls (VirtualService, DestinationRule), the base under
    #: the registry's config store (``meshserve apply``); None: the store's alone.
    config_dir: Path | None = None
    #: The worker's secret, sent with every call to it (a worker on a TCP port checks it:
    #: mesh.server.sidecar_secret); None: the worker is on a private Unix socket.
    app_secret: str | None = field(default=None, repr=False)
    #: Seconds the worker may answer no health check before the sidecar gives up on it
    #: (``hung`` is set: ``meshserve run`` kills the worker, to be restarted); 0: never. Off
    #: for a sidecar alone, which cannot restart its worker (in a pod the kubelet's
    #: livenessProbe on the worker's container does).
    liveness_window: float = 0.0

    def __post_init__(self) -> None:
        if not self.service or not self.app_address:
            raise InvalidArgument("sidecar: service and app address are required")
        if self.drain_delay < 0 or self.grace_seconds < 0:
            raise InvalidArgument("sidecar: drain delay and grace must be >= 0")
        if not self.liveness_window >= 0:
            raise InvalidArgument(
                f"sidecar: the liveness window must be >= 0 s, got {self.liveness_window}"
            )
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise InvalidArgument(
                f"sidecar: max concurrency must be >= 1, got {self.max_concurrency}"
            )

    #: Seconds between checks of ``config_dir`` for changed policies.
    reload_interval: float = 1.0

    @property
    def workload(self) -> Workload:
        return Workload(self.namespace, (("app", self.service), *self.labels))


@dataclass
class SidecarPolicies:
    """The security resources in force (a config snapshot's, or none)."""

    peer_authentications: Sequence[PeerAuthentication] = ()
    authorization_policies: Sequence[AuthorizationPolicy] = ()
    request_authentications: Sequence[RequestAuthentication] = ()


class Sidecar:
    """A worker's sidecar.

    Its port is the HTTP/2 relay in inbound mode (:mod:`mesh.proxy.inbound`). Inbound
    calls pass, in order: the mTLS handshake (a certificate of the mesh CA), telemetry (a
    span and request metrics), the PeerAuthentication check, AuthorizationPolicy, the
    concurrency limit, then go to the worker as HTTP/2 frames, never decoded. Health and
    reflection are answered by the sidecar's own gRPC server, behind the relay on a
    private Unix socket. The instance is registered with the sidecar's address, starts
    NOT_SERVING, and follows the worker's health.
    """

    def __init__(
        self,
        settings: SidecarSettings,
        store: Store,
        *,
        certificates: CertificateSource | None = None,
        policies: SidecarPolicies | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._certificates = certificates
        self.policies = policies or SidecarPolicies()
        self._telemetry = telemetry
        self.limit = ConcurrencyLimit(settings.max_concurrency)
        self._authorizer = Authorizer(
            lambda: self.policies.authorization_policies, settings.workload
        )
        #: RequestAuthentication at the inbound: end-user JWTs for AuthorizationPolicy.
        self.authn = RequestAuthenticator(
            lambda: self.policies.request_authentications, settings.workload
        )
        #: The worker's health and load reports (the calls themselves go through the relay).
        self.channel = grpc.aio.insecure_channel(settings.app_address)
        #: Sent on the sidecar's own calls to the worker (health, load): a worker on a TCP
        #: port serves only calls carrying its secret (mesh/server/sidecar_secret.py).
        self.app_metadata: tuple[tuple[str, str], ...] = (
            ((SECRET_HEADER, settings.app_secret),) if settings.app_secret is not None else ()
        )
        #: The sidecar's own gRPC server (health, reflection); its port and address are
        #: the relay's, which callers dial.
        self.serving: Serving | None = None
        self.relay: Relay | None = None
        #: Why the last policy reload was rejected (None: none was).
        self.last_rejection: str | None = None
        #: PERMISSIVE's plaintext listener (``host:port``), when a plaintext port is set.
        self.plaintext_address: str | None = None
        #: The worker's way out (the relay in routing mode), when an outbound port is set.
        self.outbound: Outbound | None = None
        self.registration: Registration | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        #: The plaintext health listener's address (``health_port``), once bound; it stops
        #: with ``serving``.
        self.health_address: str | None = None
        self.mode: MtlsMode = "DISABLE"
        #: What the joining worker was told to preload (False: nothing was sent).
        self.preloaded: frozenset[Version] | bool | None = False
        #: Set once the worker has been silent for the liveness window (why: ``hang``).
        self.hung = asyncio.Event()
        self.hang: Hung | None = None

    async def _publish_load(self) -> None:
        """Load rides on the heartbeats (once a second): advisory, like Consul's.

        The worker's own report (in flight, queue depth, memory, loaded model versions:
        trailing metadata on ServerReady) goes into the instance, so the gateway and
        ``meshserve registry status`` see which versions are warm where.
        """
        probe = LoadProbe(self.channel, self.app_metadata)
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            if self.registration is None:
                continue
            report = await probe.read()
            await self.registration.update(
                # The interval's average, not this instant's count: the autoscaler reads
                # these once a second, and an instant may fall between calls.
                load=registry_load(report, round(self.limit.average())),
                models=model_refs(report) if report is not None else None,
                publish=False,
            )

    def _admit(self, peer: PeerInfo, request: RequestAttributes) -> None:
        """The relay's check of each call: PeerAuthentication, then AuthorizationPolicy."""
        check_peer(self.mode, peer)
        self._authorizer.check(request)

    async def start(self) -> Serving:
        s = self.settings
        self.mode = s.mtls or resolve_mode(self.policies.peer_authentications, s.workload).mode
        if self.mode != "DISABLE" and self._certificates is None:
            raise FailedPrecondition(
                f"mTLS mode {self.mode} needs certificates (run `meshserve certs init`)"
            )
        if s.plaintext_port is not None and "plaintext" not in listeners_for(self.mode)[1:]:
            raise InvalidArgument(
                f"a plaintext port is PERMISSIVE's second listener; mTLS here is {self.mode}"
            )
        if self.mode == "PERMISSIVE" and s.plaintext_port is None:
            log.warning(
                "PERMISSIVE without --plaintext-port: only mutual TLS is served; "
                "plaintext callers are refused"
            )
        tls = None
        if listeners_for(self.mode)[0] == "mtls":
            assert self._certificates is not None
            tls = self._certificates.ssl_server_context()
        # The sidecar's own services on a Unix socket in a private folder: only this user
        # can reach them without the relay's checks. Telemetry records the calls the relay
        # hands it; the relay records those it forwards.
        private = PrivateSocket.create("meshserve-sidecar-")
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self._telemetry is not None:
            interceptors.append(TelemetryServerInterceptor(self._telemetry))
        try:
            serving = self.serving = await start_server(
                ServerSettings(host=private.address, grace_seconds=s.grace_seconds),
                [Service(INBOUND_SERVICE, lambda server: None)],
                interceptors=interceptors,
            )
        except BaseException:
            private.remove()
            raise
        # Not serving until the worker says it is.
        await serving.set_serving(False)

        async def remove_folder() -> None:
            private.remove()

        serving.on_drain(remove_folder)
        relay = self.relay = Relay(
            GatewayState(),  # nothing to route: every call goes to the worker
            internal_address=serving.address,
            telemetry=self._telemetry,
            inbound=Inbound(s.app_address, self._admit, self.limit, app_secret=s.app_secret),
            authn=self.authn,
            limits=INBOUND_LIMITS,
        )
        serving.before_stop(relay.drain)
        try:
            port = await relay.start(s.host, s.port, tls=tls)
            if s.plaintext_port is not None:
                # PERMISSIVE's second listener: the same checks, no TLS, so callers outside
                # the mesh are served anonymously (policies see no principal).
                plain = await relay.start(s.host, s.plaintext_port)
                self.plaintext_address = f"{s.host}:{plain}"
        except BaseException:
            await serving.drain(grace=0)
            raise
        # What callers dial is the relay.
        serving.port = port
        serving.settings = ServerSettings(host=s.host, port=port, grace_seconds=s.grace_seconds)
        instance = Instance(
            service=s.service,
            instance_id=s.instance_id or f"{s.service}-{socket.gethostname()}-{port}",
            address=f"{'localhost' if s.host in ('127.0.0.1', '::1') else s.host}:{port}",
            labels=dict(s.labels),
            status=Status.NOT_SERVING,
        )
        self.registration = self._store.registration(
            instance, ttl=s.lease_ttl, interval=s.heartbeat_interval
        )
        try:
            await self.registration.register()
        except BaseException:
            await self.serving.drain(grace=0)
            raise
        self.registration.start()
        if s.health_port is not None:
            await self._start_health(s.host, s.health_port)
        if s.outbound_port is not None:
            await self._start_outbound(s.outbound_port)
        liveness = Liveness(s.liveness_window) if s.liveness_window > 0 else None
        mirror = HealthMirror(
            self.channel,
            self._worker_health,
            metadata=self.app_metadata,
            liveness=liveness,
            on_hung=self._worker_hung if liveness is not None else None,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(mirror.run()),
            loop.create_task(self._publish_load()),
            loop.create_task(self.authn.jwks.run()),
            loop.create_task(self._preload()),
        ]
        if s.config_dir is not None:
            self._tasks.append(loop.create_task(self._watch_policies(s.config_dir)))
        log.info(
            "sidecar for %s on %s (mTLS %s) -> %s",
            s.service,
            self.serving.address,
            self.mode,
            s.app_address,
        )
        return self.serving

    async def _start_health(self, host: str, port: int) -> None:
        """Serves the sidecar's own health servicer, and nothing else, in plaintext: it
        tells SERVING or NOT_SERVING, which the registry publishes anyway."""
        assert self.serving is not None
        try:
            self.health_address = await serve_health_port(self.serving, host, port)
        except BaseException:
            await self.drain()
            raise

    async def _start_outbound(self, port: int) -> None:
        """The worker's way out: the relay in routing mode on localhost, mTLS to peers.

        Routed by the config pipeline the gateway uses: the config directory, with the
        registry's config store over it (``meshserve apply`` reaches every outbound).
        Peers are sidecars: with certificates, every upstream connection presents this
        workload's certificate (new connections pick up rotated ones).
        """
        tls_context = None
        if self._certificates is not None:
            tls_context = self._certificates.ssl_client_context
        self.outbound = Outbound(
            RegistryDiscovery(self._store.watcher()),
            config_dir=self.settings.config_dir,
            config_store=self._store.config(validator=validate_documents),
            tls_context=tls_context,
            telemetry=self._telemetry,
            reload_interval=self.settings.reload_interval,
            # The worker's own locality labels place it for localityLbSetting.
            locality=own_locality(self.settings.labels),
        )
        try:
            address = await self.outbound.start(port)
        except BaseException:
            self.outbound = None
            await self.drain()
            raise
        log.info("outbound for %s on %s", self.settings.service, address)

    async def _watch_policies(self, directory: Path) -> None:
        """Reloads the security policies when the config folder changes (last known good).

        AuthorizationPolicy applies from the next call. A PeerAuthentication change moves
        the per-call check; the listeners (TLS or not) stay as started, so a change that
        needs another listener takes a restart, and the log says so.
        """
        seen = await asyncio.to_thread(fingerprint, directory)
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            current = await asyncio.to_thread(fingerprint, directory)
            if current == seen:
                continue
            seen = current
            try:
                config = await asyncio.to_thread(config_from_path, directory)
            except ConfigError as exc:
                self.last_rejection = exc.message
                log.error("policies rejected, keeping the previous ones: %s", exc.message)
                continue
            self.policies = SidecarPolicies(
                config.peer_authentications,
                config.authorization_policies,
                config.request_authentications,
            )
            if self.settings.mtls is None:
                mode = resolve_mode(config.peer_authentications, self.settings.workload).mode
                if listeners_for(mode)[0] != listeners_for(self.mode)[0]:
                    log.warning(
                        "mTLS mode %s needs other listeners than %s: restart the sidecar",
                        mode,
                        self.mode,
                    )
                else:
                    self.mode = mode
            log.info("policies reloaded from %s (mTLS %s)", directory, self.mode)

    async def _preload(self) -> None:
        """Tells a joining worker which versions the ring will send it (if it asks)."""
        self.preloaded = await send_preload(self.channel, self._ring_owned, self.app_metadata)

    async def _ring_owned(self, versions: dict[str, list[int]]) -> frozenset[Version] | None:
        """The versions the gateway's ring gives this unit once it is SERVING (None: the
        ring tells nothing), from the routing config the gateway reads (the config folder
        under the registry's config store) and the service's endpoints in the registry."""
        s = self.settings
        pipeline = ConfigPipeline(
            GatewayState(),
            config_dir=s.config_dir,
            store=self._store.config(validator=validate_documents),
        )
        await pipeline.start()
        watcher = self._store.watcher(s.service)
        if await watcher.poll() is None or self.registration is None:
            return None  # the registry cannot be read: no idea who else serves
        peers = [
            endpoint_from_instance(RegisteredInstance.of(i)) for i in watcher.snapshot().values()
        ]
        own = endpoint_from_instance(RegisteredInstance.of(self.registration.instance))
        found = owned_versions(pipeline.state.config, s.service, peers, own, versions)
        if found is not None:
            log.info("the ring gives this worker keys %s", ", ".join(found.keys) or "none")
        return None if found is None else found.owned

    async def _worker_hung(self, hang: Hung) -> None:
        self.hang = hang
        self.hung.set()

    async def _worker_health(self, serving: bool) -> None:
        if self._draining or self.registration is None or self.serving is None:
            return
        status = Status.SERVING if serving else Status.NOT_SERVING
        await self.serving.set_serving(serving)
        try:
            await self.registration.update(status=status)
        except Exception as exc:  # the next heartbeat carries it
            log.warning("could not publish %s for %s: %s", status, self.settings.service, exc)

    async def drain(self) -> None:
        """DRAINING (still serving) → deregister → stop taking calls, finish in-flight → stop."""
        if self._draining or self.serving is None:
            return
        self._draining = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.update(status=Status.DRAINING)
        await self.serving.set_serving(False)
        # Callers that have not seen DRAINING yet still get served meanwhile.
        await asyncio.sleep(self.settings.drain_delay)
        if self.registration is not None:
            try:
                await self.registration.deregister()
            except Exception as exc:
                log.warning("deregistration failed (the lease will expire): %s", exc)
        # The relay first (GOAWAY, in-flight calls finish), then the server behind it.
        await self.serving.drain()
        # Outbound last: in-flight inbound calls may have needed it to finish.
        if self.outbound is not None:
            await self.outbound.drain(self.settings.grace_seconds)
        await self.channel.close()

    async def run_until_signal(self) -> None:
        """Serves until SIGTERM/SIGINT, then drains."""
        assert self.serving is not None
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
            log.info("signal received: draining the sidecar of %s", self.settings.service)
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
