"""VirtualService: ordered HTTP rules that match gRPC calls and pick weighted destinations."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Literal

import grpc

from mesh.config.fields import Node
from mesh.config.hosts import normalise_host
from mesh.config.resource import Metadata

# --- value types ------------------------------------------------------------------------


@dataclass(frozen=True)
class StringMatch:
    """Istio's StringMatch; ``present`` is the empty match ``{}`` (header presence)."""

    kind: Literal["exact", "prefix", "regex", "present"]
    value: str = ""
    #: Compiled once at load time for ``regex`` (RE2-style full match, as in Istio).
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

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
    """A mesh host (normalised to its service name), optional subset and port."""

    host: str
    subset: str | None = None
    port: int | None = None

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


#: Status codes each retryOn token stands for. Envoy's HTTP tokens are accepted so Istio
#: files carry over; for gRPC they mean the statuses the HTTP codes map to.
RETRY_ON_CODES: dict[str, frozenset[grpc.StatusCode]] = {
    "cancelled": frozenset({grpc.StatusCode.CANCELLED}),
    "deadline-exceeded": frozenset({grpc.StatusCode.DEADLINE_EXCEEDED}),
    "internal": frozenset({grpc.StatusCode.INTERNAL}),
    "resource-exhausted": frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}),
    "unavailable": frozenset({grpc.StatusCode.UNAVAILABLE}),
    "5xx": frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }
    ),
    "gateway-error": frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}),
    "retriable-status-codes": frozenset({grpc.StatusCode.UNAVAILABLE}),
    "retriable-4xx": frozenset({grpc.StatusCode.ABORTED}),
    # Connection-level failures: the upstream never saw the call.
    "connect-failure": frozenset(),
    "refused-stream": frozenset(),
    "reset": frozenset(),
}
CONNECTION_FAILURE_TOKENS = frozenset({"connect-failure", "refused-stream", "reset", "5xx"})
#: Istio's default when a rule has no ``retries``: 2 attempts on these conditions.
DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)
DEFAULT_RETRY_ATTEMPTS = 2


@dataclass(frozen=True)
class RetryPolicy:
    """``retries``: how many extra attempts, each bounded how long, on which failures."""

    attempts: int = DEFAULT_RETRY_ATTEMPTS
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = DEFAULT_RETRY_ON

    @property
    def codes(self) -> frozenset[grpc.StatusCode]:
        return frozenset().union(*(RETRY_ON_CODES[token] for token in self.retry_on))

    def retries_connection_failures(self) -> bool:
        return bool(self.retry_on & CONNECTION_FAILURE_TOKENS)

    def should_retry(self, code: grpc.StatusCode, *, connection_failure: bool = False) -> bool:
        """Whether a failed attempt with ``code`` may be tried again on another endpoint."""
        if connection_failure and self.retries_connection_failures():
            return True
        return code in self.codes


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
    retries: RetryPolicy = RetryPolicy()
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
    gateways: tuple[str, ...] = ()
    export_to: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"VirtualService/{self.metadata.name}"

    @functools.cached_property
    def matches_model(self) -> bool:
        """Whether a rule matches on the model a request names: routing then waits for
        the request's first message (and reads it once, for the match and the hash key)."""
        return any(m.model is not None for rule in self.http for m in rule.matches)


# --- parsing ----------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+\-.^_`|~]+")

#: HTTP status → gRPC status, as gRPC's own HTTP-to-gRPC mapping document defines it.
HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}


def parse_virtual_service(spec: Node, metadata: Metadata) -> VirtualService:
    spec.mapping(
        ("hosts", "gateways", "http", "exportTo"),
        unsupported=("tcp", "tls"),
        required=("hosts",),
    )
    hosts = tuple(_host(node) for node in spec.child("hosts").items())
    if not hosts:
        spec.child("hosts").fail("must name at least one host")
    http = tuple(_http_route(node, index) for index, node in enumerate(spec.child("http").items()))
    return VirtualService(
        metadata=metadata,
        hosts=hosts,
        http=http,
        gateways=spec.child("gateways").string_list(),
        export_to=spec.child("exportTo").string_list(),
    )


def _host(node: Node) -> str:
    text = node.string()
    try:
        return normalise_host(text)
    except ValueError as exc:
        node.fail(str(exc))


def _http_route(node: Node, index: int) -> HTTPRoute:
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
    route = tuple(_route_destination(item) for item in node.child("route").items())
    if not route:
        node.child("route").fail("must have at least one destination")
    _check_weights(node.child("route"), route)
    timeout = node.child("timeout").duration(0.0, allow_zero=True) if node.has("timeout") else None
    mirror = _destination(node.child("mirror")) if node.has("mirror") else None
    mirror_percentage = node.child("mirrorPercentage").percentage()
    if mirror_percentage is not None and mirror is None:
        node.child("mirrorPercentage").fail("is set but there is no mirror")
    return HTTPRoute(
        index=index,
        name=node.child("name").opt_string() or "",
        matches=tuple(_match(item) for item in node.child("match").items()),
        route=route,
        # Istio: "0s" disables the timeout, like leaving it out.
        timeout=timeout or None,
        retries=_retries(node.child("retries")),
        fault=_fault(node.child("fault")) if node.has("fault") else None,
        mirror=mirror,
        mirror_percentage=100.0 if mirror_percentage is None else mirror_percentage,
        headers=_headers(node.child("headers")),
    )


def _check_weights(node: Node, route: tuple[RouteDestination, ...]) -> None:
    if len(route) == 1:
        return
    total = sum(r.weight for r in route)
    if total != 100:
        weights = " + ".join(str(r.weight) for r in route)
        node.fail(f"destination weights must sum to 100, got {weights} = {total}")


def _route_destination(node: Node) -> RouteDestination:
    node.mapping(("destination", "weight", "headers"), required=("destination",))
    # A lone destination gets all traffic; with several, weights are checked to sum to 100.
    weight_node = node.child("weight")
    weight = weight_node.integer(100 if weight_node.value is None else 0, 0, 100)
    return RouteDestination(
        destination=_destination(node.child("destination")),
        weight=weight,
        headers=_headers(node.child("headers")),
    )


def _destination(node: Node) -> Destination:
    node.mapping(("host", "subset", "port"), required=("host",))
    port = None
    if node.has("port"):
        port_node = node.child("port").mapping(("number",), required=("number",))
        port = port_node.child("number").integer(0, 1, 65535)
    subset = node.child("subset").opt_string()
    return Destination(host=_host(node.child("host")), subset=subset, port=port)


def _match(node: Node) -> MatchRequest:
    node.mapping(
        ("name", "uri", "headers", "withoutHeaders", "ignoreUriCase", "x-meshserve"),
        unsupported=(
            "scheme",
            "method",
            "authority",
            "port",
            "sourceLabels",
            "gateways",
            "queryParams",
            "sourceNamespace",
            "statPrefix",
        ),
    )
    ignore_case = node.child("ignoreUriCase").boolean(False)
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
            pattern = re.compile(value, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            node.child(kind).fail(f"is not a valid regular expression: {exc}")
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
    set_ = tuple(
        (_header_name(v, k), v.string(allow_empty=True)) for k, v in node.child("set").entries()
    )
    add = tuple(
        (_header_name(v, k), v.string(allow_empty=True)) for k, v in node.child("add").entries()
    )
    remove = tuple(_header_name(item, item.string()) for item in node.child("remove").items())
    return HeaderOperations(set=set_, add=add, remove=remove)


def _retries(node: Node) -> RetryPolicy:
    if node.value is None:
        return RetryPolicy()
    node.mapping(
        ("attempts", "perTryTimeout", "retryOn"),
        unsupported=("retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"),
    )
    attempts = node.child("attempts").integer(DEFAULT_RETRY_ATTEMPTS, 0, 100)
    per_try = node.child("perTryTimeout").duration() if node.has("perTryTimeout") else None
    retry_on = DEFAULT_RETRY_ON
    if node.has("retryOn"):
        on = node.child("retryOn")
        tokens = [t.strip() for t in on.string().split(",") if t.strip()]
        for token in tokens:
            if token not in RETRY_ON_CODES:
                on.fail(
                    f"unknown retry condition {token!r} (expected some of: "
                    f"{', '.join(RETRY_ON_CODES)})"
                )
        retry_on = frozenset(tokens)
    return RetryPolicy(attempts=attempts, per_try_timeout=per_try, retry_on=retry_on)


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
        return HTTP_TO_GRPC.get(status, grpc.StatusCode.UNKNOWN)
    names = [c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK]
    name = node.child("grpcStatus").choice(names)
    return grpc.StatusCode[name]
