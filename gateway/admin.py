"""meshserve.mesh.v1.Admin on the gateway: config dump/apply, endpoints, rings, route explain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from mesh.balance.endpoints import InstanceView
from mesh.config.gateway import MESH, qualify
from mesh.config.hosts import normalise_host
from mesh.config.loader import Document, parse_yaml
from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.config.snapshot import MeshConfig
from mesh.config.views import MESH_VIEW, View, gateway_view
from mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from mesh.routing.decision import RequestInfo
from mesh.routing.discovery import EndpointTable
from mesh.routing.hashkey import RequestFields
from mesh.routing.services import split_method
from mesh.routing.state import GatewayState
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_EXPLAIN_METHOD = "/inference.GRPCInferenceService/ModelInfer"
Context = grpc.aio.ServicerContext[object, object]


class Applier(Protocol):
    """Applies YAML over the running config: validated against the mesh, maybe through a store."""

    def __call__(
        self, text: str, *, expected_version: int, dry_run: bool
    ) -> Awaitable[MeshConfig]: ...


class Rollback(Protocol):
    """Restores the config before the running one: (config, what was restored, overlay)."""

    def __call__(
        self, *, expected_version: int, dry_run: bool
    ) -> Awaitable[tuple[MeshConfig, str, list[Document]]]: ...


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _status(status: str) -> admin_pb2.ServingStatus.ValueType:
    name = status.upper()
    name = name if name.startswith("SERVING_STATUS_") else f"SERVING_STATUS_{name}"
    try:
        return admin_pb2.ServingStatus.Value(name)
    except ValueError:
        return admin_pb2.SERVING_STATUS_UNSPECIFIED


def _host(text: str) -> str:
    try:
        return normalise_host(text)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


class Admin(admin_pb2_grpc.AdminServicer):
    """Reads and changes one gateway's :class:`GatewayState`; one call per RPC."""

    def __init__(
        self,
        state: GatewayState,
        table: EndpointTable,
        *,
        staleness: Callable[[], float] = lambda: 0.0,
        applier: Applier | None = None,
        rollback: Rollback | None = None,
    ) -> None:
        self.state = state
        self.table = table
        self._staleness = staleness
        #: Where ApplyConfig writes; None: the running config only, unchecked against the
        #: mesh (a bare Admin in tests; the gateway always passes its own).
        self._applier = applier
        #: What RollbackConfig calls; None: rollback is not offered.
        self._rollback = rollback

    def _instance(self, instance: InstanceView) -> admin_pb2.Instance:
        load = instance.load
        # Registry instances also carry queue depth, memory and loaded versions; test
        # doubles and static endpoints may not.
        return admin_pb2.Instance(
            id=instance.id,
            service=instance.service,
            address=instance.address,
            labels=dict(instance.labels),
            status=_status(instance.status),
            load=admin_pb2.Load(
                in_flight=load.in_flight if load is not None else 0,
                queue_depth=getattr(load, "queue_depth", 0),
                memory_bytes=getattr(load, "memory_bytes", 0),
            ),
            loaded_models=[
                admin_pb2.LoadedModel(name=m.model, version=m.version)
                for m in getattr(instance, "models", ())
            ],
        )

    async def ListInstances(
        self, request: admin_pb2.ListInstancesRequest, context: Context
    ) -> admin_pb2.ListInstancesResponse:
        instances = [
            self._instance(i)
            for i in self.table.instances()
            if not request.service or i.service == request.service
        ]
        return admin_pb2.ListInstancesResponse(
            instances=instances, staleness_seconds=self._staleness()
        )

    async def ListEndpoints(
        self, request: admin_pb2.ListEndpointsRequest, context: Context
    ) -> admin_pb2.ListEndpointsResponse:
        clusters = self.state.clusters
        host_filter = _host(request.host) if request.host else None
        mono_now, wall_now = self.state.clock(), self.state.wall_clock()
        groups = []
        for host, subset in clusters.known():
            if host_filter is not None and host != host_filter:
                continue
            cluster = clusters.cluster(host, subset)
            endpoints = []
            for e in cluster.members.endpoints:
                outlier = cluster.outliers.state(e.address) if cluster.outliers else None
                message = admin_pb2.Endpoint(
                    address=e.address,
                    instance_id=e.instance_id,
                    labels=dict(e.labels),
                    healthy=e.healthy,
                    in_flight=self.state.tracker.in_flight(e.address),
                    weight=e.weight,
                )
                if outlier is not None:
                    message.ejected = outlier.ejected
                    message.ejection_count = outlier.ejection_count
                    message.consecutive_errors = outlier.consecutive_errors
                    if outlier.ejected_until is not None:
                        message.ejected_until.CopyFrom(
                            _timestamp(wall_now + outlier.ejected_until - mono_now)
                        )
                endpoints.append(message)
            groups.append(
                admin_pb2.EndpointGroup(
                    host=host,
                    subset=subset,
                    endpoints=endpoints,
                    ring_generation=cluster.members.generation,
                )
            )
        return admin_pb2.ListEndpointsResponse(groups=groups)

    async def GetRing(self, request: admin_pb2.GetRingRequest, context: Context) -> admin_pb2.Ring:
        host = _host(request.host)
        config = self.state.config
        rule = config.destination_rule(host)
        if request.subset and (rule is None or rule.subset(request.subset) is None):
            raise NotFound(f"host {host!r} has no subset {request.subset!r}")
        cluster = self.state.clusters.cluster(host, request.subset)
        ring = cluster.ring
        if ring is None:
            raise FailedPrecondition(
                f"{cluster.members.describe()} balances with {cluster.policy.load_balancer.describe()}; "
                "only consistentHash has a ring"
            )
        shares, points = ring.shares(), ring.points()
        owners: dict[str, list[str]] = {}
        for key in request.keys:
            owner = ring.primary(key)
            if owner is not None:
                owners.setdefault(owner.address, []).append(key)
        members = [
            admin_pb2.RingMember(
                address=a, share=shares[a], points=points[a], keys=owners.get(a, [])
            )
            for a in sorted(shares)
        ]
        return admin_pb2.Ring(
            host=host, subset=request.subset, members=members, generation=ring.generation
        )

    async def ExplainRoute(
        self, request: admin_pb2.ExplainRouteRequest, context: Context
    ) -> admin_pb2.ExplainRouteResponse:
        if request.method and split_method(request.method) is None:
            # The argument is malformed, not a call: the data plane's UNIMPLEMENTED (what
            # a gRPC server answers an unknown path) would read as "no route matches".
            raise InvalidArgument(
                f"method: {request.method!r} is not a gRPC method path "
                "(want /package.Service/Method)"
            )
        fields = None
        if request.model_name or request.model_version:
            fields = RequestFields(request.model_name, request.model_version)
        info = RequestInfo(
            request.method or DEFAULT_EXPLAIN_METHOD,
            tuple((k.lower(), v) for k, v in sorted(request.headers.items())),
            fields=fields,
        )
        view = self._view(request.view)
        try:
            decision = self.state.decide(info, explain=True, view=view)
        except KeyError:
            known = ", ".join(sorted(self.state.config.gateways)) or "none"
            raise NotFound(
                f"no Gateway {request.view!r} in the running config (Gateways: {known})"
            ) from None
        return admin_pb2.ExplainRouteResponse(
            route=decision.route,
            host=decision.host,
            subset=decision.subset,
            hash_key=decision.hash_key.key if decision.hash_key else "",
            hash_source=decision.hash_key.source if decision.hash_key else "",
            endpoint=decision.endpoint.address if decision.endpoint else "",
            candidates=[e.address for e in decision.candidates],
            steps=list(decision.explanation),
        )

    @staticmethod
    def _view(name: str) -> View | None:
        """``ExplainRouteRequest.view``: empty for this ingress, ``mesh``, or a Gateway
        named as VirtualService ``gateways`` name one."""
        if not name:
            return None
        if name == MESH:
            return MESH_VIEW
        return gateway_view(qualify(name, DEFAULT_NAMESPACE))

    async def DumpConfig(
        self, request: admin_pb2.DumpConfigRequest, context: Context
    ) -> admin_pb2.ConfigDump:
        config = self.state.config
        dump = admin_pb2.ConfigDump(
            version=config.version,
            source=config.source,
            resources=[
                admin_pb2.ConfigResource(
                    kind=d.kind,
                    name=d.resource.metadata.name,
                    namespace=d.resource.metadata.namespace,
                    yaml=d.yaml,
                )
                for d in config.documents
            ],
        )
        dump.applied_at.CopyFrom(_timestamp(self.state.applied_at))
        rejection = self.state.last_rejection
        if rejection is not None:
            dump.last_rejection.CopyFrom(
                admin_pb2.ConfigRejection(
                    source=rejection.source,
                    error=rejection.error,
                    rejected_at=_timestamp(rejection.at),
                )
            )
        return dump

    async def ApplyConfig(
        self, request: admin_pb2.ApplyConfigRequest, context: Context
    ) -> admin_pb2.ApplyConfigResponse:
        source = "admin"
        if self._applier is not None:
            config = await self._applier(
                request.yaml, expected_version=request.expected_version, dry_run=request.dry_run
            )
        else:
            config = self.state.apply(
                lambda: parse_yaml(request.yaml, source),
                source=source,
                expected_version=request.expected_version,
                dry_run=request.dry_run,
            )
        refs = [d.ref for d in parse_yaml(request.yaml, source)]
        version = self.state.config.version if request.dry_run else config.version
        return admin_pb2.ApplyConfigResponse(version=version, resources=refs)

    async def RollbackConfig(
        self, request: admin_pb2.RollbackConfigRequest, context: Context
    ) -> admin_pb2.RollbackConfigResponse:
        if self._rollback is None:
            raise FailedPrecondition("this gateway keeps no config history to roll back to")
        config, restored, overlay = await self._rollback(
            expected_version=request.expected_version, dry_run=request.dry_run
        )
        version = self.state.config.version if request.dry_run else config.version
        return admin_pb2.RollbackConfigResponse(
            version=version, restored=restored, resources=[d.ref for d in overlay]
        )
