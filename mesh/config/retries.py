"""VirtualService ``retries``: Istio's retry policy, its conditions and its rules."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from mesh.config.fields import Node

#: HTTP status → gRPC status, as gRPC's own HTTP-to-gRPC mapping document defines it
#: (any other status maps to UNKNOWN).
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


def http_to_grpc(status: int) -> grpc.StatusCode:
    return HTTP_TO_GRPC.get(status, grpc.StatusCode.UNKNOWN)


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
    # Envoy retries the numeric codes listed beside it (Istio puts them there); alone it
    # retries nothing. Its statuses are those of the numeric tokens (RetryPolicy.codes).
    "retriable-status-codes": frozenset(),
    "retriable-4xx": frozenset({grpc.StatusCode.ABORTED}),
    # Connection-level failures: the upstream never saw the call.
    "connect-failure": frozenset(),
    "refused-stream": frozenset(),
    "reset": frozenset(),
    "reset-before-request": frozenset(),
    # Envoy's conditions that cannot arise here, accepted as Envoy treats them without
    # their triggers: no rate-limit service answers x-envoy-ratelimited, Istio cannot
    # configure retriable headers, and meshserve speaks no HTTP/3.
    "envoy-ratelimited": frozenset(),
    "retriable-headers": frozenset(),
    "http3-post-connect-failure": frozenset(),
}
CONNECTION_FAILURE_TOKENS = frozenset(
    {"connect-failure", "refused-stream", "reset", "reset-before-request", "5xx"}
)
#: Istio's default when a rule has no ``retries``: 2 attempts on these conditions, with
#: 503 as the retriable status code.
DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRIABLE_STATUS_CODES = frozenset({503})
#: Envoy's jittered back-off between tries: base 25 ms, capped at ten times that.
BACKOFF_BASE = 0.025
BACKOFF_MAX = 0.25


@dataclass(frozen=True)
class RetryPolicy:
    """``retries``: how many extra attempts, each bounded how long, on which failures."""

    attempts: int = DEFAULT_RETRY_ATTEMPTS
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    #: Numeric tokens of ``retryOn`` (HTTP statuses), for ``retriable-status-codes``.
    status_codes: frozenset[int] = DEFAULT_RETRIABLE_STATUS_CODES

    @property
    def codes(self) -> frozenset[grpc.StatusCode]:
        codes: frozenset[grpc.StatusCode] = frozenset().union(
            *(RETRY_ON_CODES[token] for token in self.retry_on)
        )
        if "retriable-status-codes" in self.retry_on:
            codes |= {http_to_grpc(status) for status in self.status_codes}
        return codes

    def retries_connection_failures(self) -> bool:
        return bool(self.retry_on & CONNECTION_FAILURE_TOKENS)

    def should_retry(self, code: grpc.StatusCode, *, connection_failure: bool = False) -> bool:
        """Whether a failed attempt with ``code`` may be tried again."""
        if connection_failure and self.retries_connection_failures():
            return True
        return code in self.codes


#: ``retries`` present but without attempts: Istio disables retries.
NO_RETRIES = RetryPolicy(attempts=0, retry_on=frozenset(), status_codes=frozenset())


def parse_retries(node: Node) -> RetryPolicy:
    """Istio's rules: absent → the default policy; present without ``attempts`` (or with
    0) → no retries, and then ``perTryTimeout`` or ``retryOn`` is an error (Istio's
    validation: a retry policy configured while retries are disabled)."""
    if node.value is None:
        return RetryPolicy()
    node.mapping(
        ("attempts", "perTryTimeout", "retryOn"),
        unsupported=("retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"),
    )
    attempts = node.child("attempts").integer(0, 0, 2**31 - 1)
    if attempts == 0:
        for key in ("perTryTimeout", "retryOn"):
            if node.has(key):
                node.child(key).fail(
                    "is set while retries are disabled (attempts absent or 0), which Istio "
                    "refuses: set attempts, or remove it"
                )
        return NO_RETRIES
    per_try = node.child("perTryTimeout").duration() if node.has("perTryTimeout") else None
    retry_on = DEFAULT_RETRY_ON
    status_codes = DEFAULT_RETRIABLE_STATUS_CODES
    if node.has("retryOn"):
        retry_on, status_codes = _retry_on(node.child("retryOn"))
    return RetryPolicy(
        attempts=attempts, per_try_timeout=per_try, retry_on=retry_on, status_codes=status_codes
    )


def _retry_on(node: Node) -> tuple[frozenset[str], frozenset[int]]:
    tokens: set[str] = set()
    codes: set[int] = set()
    for token in (t.strip() for t in node.string().split(",")):
        if not token:
            continue
        if token.isdigit():
            if not 100 <= int(token) <= 599:
                node.fail(f"retry status code {token} is not an HTTP status (100-599)")
            codes.add(int(token))
        elif token in RETRY_ON_CODES:
            tokens.add(token)
        else:
            node.fail(
                f"unknown retry condition {token!r} (expected HTTP status codes or some of: "
                f"{', '.join(RETRY_ON_CODES)})"
            )
    if codes:
        # As Istio's translation does: numeric codes imply the condition that retries them.
        tokens.add("retriable-status-codes")
    if not tokens:
        node.fail("must name at least one retry condition")
    return frozenset(tokens), frozenset(codes)
