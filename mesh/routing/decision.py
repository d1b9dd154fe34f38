"""The routing decision: a pure function of config, endpoints and one request's metadata."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import Endpoint
from mesh.config.retries import RetryPolicy
from mesh.config.virtual_service import Destination, Fault, HeaderOperations, HTTPRoute
from mesh.errors import Unimplemented
from mesh.routing import headers as md
from mesh.routing.circuit import limits_text
from mesh.routing.hashkey import (
    MODEL_NAMED_METHODS,
    HashKey,
    RequestFields,
    hash_key,
    read_fields,
)
from mesh.routing.match import describe_match, find_rule, find_rule_memo
from mesh.routing.services import split_method
from mesh.routing.weights import pick_destination

#: Istio's retry policy for calls no VirtualService rule covers.
DEFAULT_RETRIES = RetryPolicy()


@dataclass(frozen=True)
class RequestInfo:
    """What routing looks at: the method path, metadata and the first message's bytes."""

    method: str
    metadata: md.Metadata = ()
    authority: str = ""
    #: The serialized first request message (or its prefix), for field hash keys.
    message: bytes | None = None
    #: Fields already known (``route explain``); wins over ``message``.
    fields: RequestFields | None = None
    #: The port of the listener the call arrived on (``match.port``); None: unknown.
    port: int | None = None
    #: The client's IP address (``consistentHash.useSourceIp``); "": not an IP client.
    source_ip: str = ""


@dataclass(frozen=True)
class RouteDecision:
    host: str
    subset: str
    #: "VirtualService/<name> http[i]" or "default" when no VirtualService routes the host.
    route: str
    rule: HTTPRoute | None
    #: Request metadata after the rule's and the destination's header edits.
    metadata: md.Metadata
    #: Response header edits to apply, rule first, then destination.
    response_headers: tuple[HeaderOperations, ...]
    timeout: float | None
    retries: RetryPolicy
    hash_key: HashKey | None
    #: Endpoints in the order to try them; empty when none is healthy.
    candidates: tuple[Endpoint, ...]
    fault: Fault | None = None
    mirror: Destination | None = None
    mirror_percentage: float = 0.0
    explanation: tuple[str, ...] = field(default=())

    @property
    def endpoint(self) -> Endpoint | None:
        return self.candidates[0] if self.candidates else None

    @property
    def target(self) -> str:
        return self.host + (f"/{self.subset}" if self.subset else "")


def decide(
    clusters: ClusterMap, request: RequestInfo, rng: random.Random, *, explain: bool = False
) -> RouteDecision:
    """Routes one call. Raises :class:`Unimplemented` for a method no mesh host serves,
    and when the host's VirtualService has no rule that matches (Envoy's "no route").

    Steps: find the host; the VirtualService's first matching rule; a weighted
    destination; header edits (rule, then destination); the hash key from the *edited*
    headers (so a canary's ``x-model-version`` keys the ring) or the request fields; the
    endpoint order from the host/subset's balancer. With ``explain`` each step is
    recorded in words in ``explanation`` (``route explain``); the proxy's hot path
    skips building those strings.
    """
    steps: list[str] = []
    if split_method(request.method) is None:
        raise Unimplemented(f"malformed method path {request.method!r}")
    host = clusters.host_for(request.method, request.authority)
    if host is None:
        raise Unimplemented(f"method {request.method} is not served by any mesh service")
    routes = clusters.routes
    if explain:
        steps.append(f"view {routes.description}")
        steps.append(f"method {request.method} is for host {host}")
    refused = routes.no_route(host)
    if refused is not None:
        # Envoy at a Gateway: no virtual host for this host (404, gRPC UNIMPLEMENTED).
        raise Unimplemented(refused)
    headers = md.as_dict(request.metadata)
    vs = routes.virtual_service(host)
    rule: HTTPRoute | None = None
    destination = Destination(host)
    metadata = request.metadata
    response_ops: list[HeaderOperations] = []
    route_name = "default"
    # The message is read at most once per call: here when a rule matches on the model
    # (the hash key below reuses it), otherwise there when the hash key needs it.
    request_fields = request.fields
    message = request.message if request_fields is None else None
    model: str | None = None
    if vs is not None and vs.matches_model and request.method in MODEL_NAMED_METHODS:
        if message is not None:
            request_fields, message = read_fields(message), None
        model = request_fields.model_name if request_fields is not None else None
        if explain:
            steps.append(
                f"the request names model {model!r}" if model else "the request names no model"
            )
    if vs is not None:
        found = find_rule_memo(vs, request.method, headers, model, port=request.port)
        if found is None:
            # Envoy answers a request no route matches with 404 (gRPC UNIMPLEMENTED): a
            # VirtualService that covers a host decides every call to it.
            raise Unimplemented(
                f"no route: no rule of {vs.ref} matches {request.method} (host {host})"
            )
        else:
            rule, matched = found
            route_name = vs.rule_refs[id(rule)]
            chosen = pick_destination(rule.route, rng)
            destination = chosen.destination
            for ops in (rule.headers.request, chosen.headers.request):
                if ops:
                    metadata = md.apply(ops, metadata)
            for ops in (rule.headers.response, chosen.headers.response):
                if ops:
                    response_ops.append(ops)
            if explain:
                steps.append(f"{route_name} matches ({describe_match(matched)})")
                if len(rule.route) > 1:
                    weights = ", ".join(
                        f"{d.destination.describe()}={d.weight}" for d in rule.route
                    )
                    steps.append(f"weighted pick among {weights}: {destination.describe()}")
                if metadata != request.metadata:
                    edited = ", ".join(
                        f"{k}={v}" for k, v in metadata if (k, v) not in request.metadata
                    )
                    steps.append(f"request headers edited ({edited or 'removals only'})")
    elif explain:
        steps.append(f"no VirtualService for {host}: default route")
    subset = destination.subset or ""
    cluster = clusters.cluster(destination.host, subset)
    ch = cluster.policy.load_balancer.consistent_hash
    key: HashKey | None = None
    if ch is not None:
        fields = cluster.extensions.hash_fields
        if fields and message is not None:
            request_fields = read_fields(message)
        if ch.use_source_ip:
            key = HashKey(request.source_ip, "source ip") if request.source_ip else None
        else:
            key = hash_key(
                header_name=ch.http_header_name,
                fields=fields,
                headers=headers if metadata is request.metadata else md.as_dict(metadata),
                request_fields=request_fields,
            )
        if explain:
            if key is not None:
                steps.append(f"hash key {key.key!r} from {key.source}")
            else:
                steps.append("consistentHash, but the request carries no hash key")
    pick = cluster.pick(key.key if key else None, rng, explain=explain)
    if explain:
        steps.extend(pick.reasons)
        target = destination.describe()
        limits = limits_text(cluster.policy.connection_pool)
        if limits:
            steps.append(f"connectionPool limits of {target}: {limits}")
        if pick.candidates:
            steps.append(f"endpoint {pick.candidates[0].address} of {target}")
        else:
            steps.append(f"no healthy endpoint for {target}")
    if rule is None:
        return RouteDecision(
            host=destination.host,
            subset=subset,
            route=route_name,
            rule=None,
            metadata=metadata,
            response_headers=(),
            timeout=None,
            retries=DEFAULT_RETRIES,
            hash_key=key,
            candidates=pick.candidates,
            explanation=tuple(steps),
        )
    return RouteDecision(
        host=destination.host,
        subset=subset,
        route=route_name,
        rule=rule,
        metadata=metadata,
        response_headers=tuple(response_ops),
        timeout=rule.timeout,
        retries=rule.retries,
        hash_key=key,
        candidates=pick.candidates,
        fault=rule.fault,
        mirror=rule.mirror,
        mirror_percentage=rule.mirror_percentage if rule.mirror else 0.0,
        explanation=tuple(steps),
    )


def route_timeout(
    clusters: ClusterMap,
    method: str,
    authority: str,
    metadata: md.Metadata,
    port: int | None = None,
) -> float | None:
    """The timeout of the rule that would route this call, found without its message
    (which hash keys may need, the rule never does): a proxy waiting for a first message
    that never comes holds the call no longer than its route allows. A rule that matches
    on the model the request names (``x-meshserve.model``) cannot hold without that
    message, so the first rule that holds without it counts here."""
    host = clusters.host_for(method, authority) if split_method(method) else None
    vs = clusters.routes.virtual_service(host) if host is not None else None
    if vs is None:
        return None
    found = find_rule(vs, method, md.as_dict(metadata), port=port)
    return found[0].timeout if found is not None else None
