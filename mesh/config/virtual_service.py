"""VirtualService: ordered HTTP rules that match gRPC calls and pick weighted destinations."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from typing import Literal

import grpc

from mesh.config.fields import Node
from mesh.config.gateway import qualify
from mesh.config.regex import Regex, RegexError, compile_regex
from mesh.config.resource import Metadata, export_to, resource_host
from mesh.config.retries import RetryPolicy, http_to_grpc, parse_retries

# --- value types ------------------------------------------------------------------------


@dataclass(frozen=True)
class StringMatch:
    """Istio's StringMatch; ``present`` is the empty match ``{}`` (header presence)."""

    kind: Literal["exact", "prefix", "regex", "present"]
    value: str = ""
    #: Compiled once at load time for ``regex`` (RE2, full match, as in Istio).
    pattern: Regex | None = field(default=None, compare=False)

    def describe(self) -> str:
        return "present" if self.kind == "present" else f"{self.kind} {self.value!r}"


@dataclass(frozen=True)
class HeaderOperations:
    """``set`` replaces, ``add`` appends a value, ``remove`` deletes (applied remove→set→add)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True)
class Headers:
    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


@dataclass(frozen=True)
class Destination:
    """A mesh host (normalised to its service name) and optional subset."""

    host: str
    subset: str | None = None

    def describe(self) -> str:
        return self.host + (f"/{self.subset}" if self.subset else "")


@dataclass(frozen=True)
class RouteDestination:
    destination: Destination
    weight: int
    headers: Headers = Headers()


@dataclass(frozen=True)
class MatchRequest:
    """One ``match`` entry: every condition in it must hold (AND)."""

    name: str = ""
    uri: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    ignore_uri_case: bool = False
    #: ``x-meshserve.model``: the model the request names (``model_name``, read from the
    #: message prefix as the hash key is); a meshserve extension beyond Istio.
    model: StringMatch | None = None
    #: ``port``: the port of the listener the call arrived on; None: any.
    port: int | None = None
    #: ``gateways`` (qualified ``ns/name`` or ``mesh``): where this entry applies,
    #: overriding the VirtualService's; empty: the VirtualService's.
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True)
class FaultDelay:
    fixed_delay: float
    percentage: float


@dataclass(frozen=True)
class FaultAbort:
    status: grpc.StatusCode
    percentage: float


@dataclass(frozen=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True)
class HTTPRoute:
    """One ``http[]`` rule."""

    index: int
    name: str = ""
    matches: tuple[MatchRequest, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    #: Whole-call timeout in seconds; None leaves the caller's deadline alone.
    timeout: float | None = None
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    fault: Fault | None = None
    mirror: Destination | None = None
    mirror_percentage: float = 100.0
    headers: Headers = Headers()

    def describe(self) -> str:
        return f"http[{self.index}]" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True)
class VirtualService:
    metadata: Metadata
    #: Normalised service names this resource routes.
    hosts: tuple[str, ...]
    http: tuple[HTTPRoute, ...]
    export_to: tuple[str, ...] = ()
    #: ``gateways`` (qualified ``ns/name`` or ``mesh``); empty: unset, which is ``mesh``
    #: in Istio (and, with no Gateway in the config, meshserve's gateway too).
    gateways: tuple[str, ...] = ()
    #: At an ingress, the VirtualServices whose rules this one holds, in order (Istio
    #: merges those of one host there); empty for a resource as written.
    merged: tuple[VirtualService, ...] = field(default=(), compare=False, repr=False)

    @property
    def ref(self) -> str:
        if self.merged:
            return " + ".join(vs.ref for vs in self.merged)
        return f"VirtualService/{self.metadata.name}"

    @functools.cached_property
    def rule_refs(self) -> dict[int, str]:
        """Each rule's name in ``route explain`` and metrics, by ``id``: the VirtualService
        that wrote it (one of those merged at an ingress) and its place there. Built once,
        so routing a call looks its name up instead of formatting it."""
        return {id(r): f"{vs.ref} {r.describe()}" for vs in self.merged or (self,) for r in vs.http}

    @functools.cached_property
    def matches_model(self) -> bool:
        """Whether a rule matches on the model a request names: routing then waits for
        the request's first message (and reads it once, for the match and the hash key)."""
        return any(m.model is not None for rule in self.http for m in rule.matches)


# --- parsing ----------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+\-.^_`|~]+")


def parse_virtual_service(spec: Node, metadata: Metadata) -> VirtualService:
    spec.mapping(
        ("hosts", "http", "exportTo", "gateways"),
        unsupported=("tcp", "tls"),
        required=("hosts",),
    )
    namespace = metadata.namespace
    hosts = tuple(_host(node, namespace) for node in spec.child("hosts").items())
    if not hosts:
        spec.child("hosts").fail("must name at least one host")
    http = tuple(
        _http_route(node, index, namespace) for index, node in enumerate(spec.child("http").items())
    )
    return VirtualService(
        metadata=metadata,
        hosts=hosts,
        http=http,
        export_to=export_to(spec.child("exportTo"), namespace),
        gateways=gateway_names(spec.child("gateways"), namespace),
    )


def _host(node: Node, namespace: str) -> str:
    """One ``hosts`` entry. Istio's wildcard forms (``*``, the bookinfo gateway's, and
    ``*.example.com``) route every host they cover at a Gateway; meshserve keys routes by
    the one mesh service a call is for, and does not support them: refused by name, with
    what to write instead, rather than as "not a DNS name"."""
    text = node.value
    if isinstance(text, str) and text.strip().startswith("*"):
        node.fail(
            f"wildcard host {text.strip()!r} is an Istio form meshserve does not support: "
            "name each mesh service the rules route (inference, training, data or their "
            "FQDNs); a Gateway server's hosts may still be '*' or '*.suffix'"
        )
    return resource_host(node, namespace)


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_GATEWAY_NAME = re.compile(rf"(?:{_DNS_LABEL}/)?{_DNS_LABEL}(\.{_DNS_LABEL})*")


def gateway_names(node: Node, namespace: str) -> tuple[str, ...]:
    """``gateways``: ``mesh``, ``name`` (a Gateway of the resource's namespace) or
    ``namespace/name``, qualified; that each names a Gateway is checked with the whole
    config (:meth:`MeshConfig.build`)."""
    names = []
    for item in node.items():
        text = item.string()
        if not _GATEWAY_NAME.fullmatch(text):
            item.fail(f"{text!r} is not a Gateway name ('mesh', 'name' or 'namespace/name')")
        names.append(qualify(text, namespace))
    if node.value is not None and not names:
        node.fail("must name at least one gateway (leave it out for 'mesh')")
    return tuple(names)


def _http_route(node: Node, index: int, namespace: str) -> HTTPRoute:
    node.mapping(
        (
            "name",
            "match",
            "route",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrorPercentage",
            "headers",
        ),
        unsupported=(
            "redirect",
            "directResponse",
            "delegate",
            "rewrite",
            "corsPolicy",
            "mirrors",
            "mirrorPercent",
            "mirror_percent",
        ),
        required=("route",),
    )
    route = tuple(_route_destination(item, namespace) for item in node.child("route").items())
    if not route:
        node.child("route").fail("must have at least one destination")
    _check_weights(node.child("route"), route)
    if len(route) == 1 and route[0].weight != 100:
        # Istio: a lone destination's weight "is assumed to be 100".
        route = (replace(route[0], weight=100),)
    timeout = node.child("timeout").duration(0.0, allow_zero=True) if node.has("timeout") else None
    mirror = _destination(node.child("mirror"), namespace) if node.has("mirror") else None
    mirror_percentage = node.child("mirrorPercentage").percentage()
    if mirror_percentage is not None and mirror is None:
        node.child("mirrorPercentage").fail("is set but there is no mirror")
    return HTTPRoute(
        index=index,
        name=node.child("name").opt_string() or "",
        matches=tuple(_match(item, namespace) for item in node.child("match").items()),
        route=route,
        # Istio: "0s" disables the timeout, like leaving it out.
        timeout=timeout or None,
        retries=parse_retries(node.child("retries")),
        fault=_fault(node.child("fault")) if node.has("fault") else None,
        mirror=mirror,
        mirror_percentage=100.0 if mirror_percentage is None else mirror_percentage,
        headers=_headers(node.child("headers")),
    )


def _check_weights(node: Node, route: tuple[RouteDestination, ...]) -> None:
    """Istio sends each destination weight/total of the traffic and refuses only a total
    of 0; a lone destination takes everything whatever its weight."""
    if len(route) == 1:
        return
    if sum(r.weight for r in route) == 0:
        node.fail("destination weights sum to 0: no destination would get any traffic")


def _route_destination(node: Node, namespace: str) -> RouteDestination:
    node.mapping(("destination", "weight", "headers"), required=("destination",))
    # Absent is 0, as in Istio's proto; a lone destination takes all traffic anyway.
    weight = node.child("weight").integer(0, 0, 2**31 - 1)
    return RouteDestination(
        destination=_destination(node.child("destination"), namespace),
        weight=weight,
        headers=_headers(node.child("headers")),
    )


def _destination(node: Node, namespace: str) -> Destination:
    # A mesh service has one port per instance (its registered address), so a port would
    # select nothing meshserve could honour: refused rather than ignored.
    node.mapping(("host", "subset"), unsupported=("port",), required=("host",))
    subset = node.child("subset").opt_string()
    return Destination(host=resource_host(node.child("host"), namespace), subset=subset)


def _match(node: Node, namespace: str) -> MatchRequest:
    node.mapping(
        (
            "name",
            "uri",
            "headers",
            "withoutHeaders",
            "ignoreUriCase",
            "x-meshserve",
            "port",
            "gateways",
        ),
        unsupported=(
            "scheme",
            "method",
            "authority",
            "sourceLabels",
            "queryParams",
            "sourceNamespace",
            "statPrefix",
        ),
    )
    ignore_case = node.child("ignoreUriCase").boolean(False)
    if ignore_case and node.child("uri").has("regex"):
        # Istio ignores case for exact and prefix only; accepting it here would let a
        # reader believe the regex ignores case while it does not.
        node.child("ignoreUriCase").fail(
            "has no effect on uri.regex in Istio (exact and prefix only): write (?i) in "
            "the regex instead"
        )
    uri = _string_match(node.child("uri"), ignore_case=ignore_case) if node.has("uri") else None
    if uri is not None and uri.kind == "present":
        node.child("uri").fail("must have one of exact, prefix or regex")
    return MatchRequest(
        name=node.child("name").opt_string() or "",
        uri=uri,
        headers=_header_matches(node.child("headers")),
        without_headers=_header_matches(node.child("withoutHeaders")),
        ignore_uri_case=ignore_case,
        model=_model_match(node.child("x-meshserve")),
        # 0 is the proto's unset value: any port, as in Istio.
        port=node.child("port").integer(0, 0, 65535) or None,
        gateways=gateway_names(node.child("gateways"), namespace),
    )


def _model_match(node: Node) -> StringMatch | None:
    """``x-meshserve: {model: {exact|prefix|regex: ...}}`` (meshserve's extension)."""
    if node.value is None:
        return None
    node.mapping(("model",), required=("model",))
    model = _string_match(node.child("model"))
    if model.kind == "present":
        node.child("model").fail("must have one of exact, prefix or regex")
    return model


def _header_matches(node: Node) -> tuple[tuple[str, StringMatch], ...]:
    matches = []
    for name, value in node.entries():
        matches.append((_header_name(value, name), _string_match(value)))
    return tuple(matches)


def _string_match(node: Node, *, ignore_case: bool = False) -> StringMatch:
    # ``{}`` (or a bare key) checks presence only, as Istio's header matching does.
    if node.value is None or node.value == {}:
        return StringMatch("present")
    node.mapping(("exact", "prefix", "regex"))
    kinds = [k for k in ("exact", "prefix", "regex") if node.has(k)]
    if len(kinds) != 1:
        node.fail("must have exactly one of exact, prefix or regex")
    kind = kinds[0]
    value = node.child(kind).string(allow_empty=kind == "exact")
    if kind == "regex":
        try:
            pattern = compile_regex(value)
        except RegexError as exc:
            node.child(kind).fail(str(exc))
        return StringMatch("regex", value, pattern)
    return StringMatch(kind, value.lower() if ignore_case else value)  # type: ignore[arg-type]


def _header_name(node: Node, name: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        node.fail("header names must be lower-case (gRPC metadata keys are)")
    if name.startswith(":") or name.startswith("grpc-"):
        node.fail("pseudo-headers and grpc-* headers are reserved")
    return name


def _headers(node: Node) -> Headers:
    if node.value is None:
        return Headers()
    node.mapping(("request", "response"))
    return Headers(
        _header_operations(node.child("request")), _header_operations(node.child("response"))
    )


def _header_operations(node: Node) -> HeaderOperations:
    if node.value is None:
        return HeaderOperations()
    node.mapping(("set", "add", "remove"))
    # HTTP/2 header names are lower case on the wire and Envoy lower-cases edits: an
    # upper-case name in an Istio file edits the same header.
    set_ = tuple(
        (_header_name(v, k.lower()), v.string(allow_empty=True))
        for k, v in node.child("set").entries()
    )
    add = tuple(
        (_header_name(v, k.lower()), v.string(allow_empty=True))
        for k, v in node.child("add").entries()
    )
    remove = tuple(
        _header_name(item, item.string().lower()) for item in node.child("remove").items()
    )
    return HeaderOperations(set=set_, add=add, remove=remove)


def _fault(node: Node) -> Fault:
    node.mapping(("delay", "abort"))
    delay = abort = None
    if node.has("delay"):
        d = node.child("delay").mapping(
            ("fixedDelay", "percentage", "percent"),
            unsupported=("exponentialDelay",),
            required=("fixedDelay",),
        )
        delay = FaultDelay(d.child("fixedDelay").duration(), _fault_percentage(d))
    if node.has("abort"):
        a = node.child("abort").mapping(
            ("grpcStatus", "httpStatus", "percentage", "percent"), unsupported=("http2Error",)
        )
        abort = FaultAbort(_abort_status(a), _fault_percentage(a))
    if delay is None and abort is None:
        node.fail("must have a delay or an abort")
    return Fault(delay=delay, abort=abort)


def _fault_percentage(node: Node) -> float:
    if node.has("percentage") and node.has("percent"):
        node.fail("set percentage or the deprecated percent, not both")
    if node.has("percent"):
        return float(node.child("percent").integer(100, 0, 100))
    value = node.child("percentage").percentage()
    # Istio: without a percentage the fault applies to every request.
    return 100.0 if value is None else value


def _abort_status(node: Node) -> grpc.StatusCode:
    if node.has("grpcStatus") == node.has("httpStatus"):
        node.fail("must have exactly one of grpcStatus or httpStatus")
    if node.has("httpStatus"):
        status = node.child("httpStatus").integer(0, 200, 599)
        return http_to_grpc(status)
    names = [c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK]
    name = node.child("grpcStatus").choice(names)
    return grpc.StatusCode[name]
