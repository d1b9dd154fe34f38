"""The per-call policy, table by table: header filter, request id, deadline budget,
http2MaxRequests admission, retry eligibility."""

from __future__ import annotations

import random

import grpc
import pytest

from mesh.config.destination_rule import UNLIMITED
from mesh.config.retries import RetryPolicy
from mesh.routing import callpolicy as policy

U = grpc.StatusCode.UNAVAILABLE
HEADERS = [
    (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-python"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"5S"),
    (b"grpc-encoding", b"identity"),
    (b"trace-bin", b"\x00"),
    (b"x-model-version", b"2"),
    (b"x-tenant", b"a"),
]


@pytest.mark.parametrize(
    ("name", "routable"),
    [
        (b":authority", False),
        (b"content-type", False),
        (b"te", False),
        (b"user-agent", False),
        (b"grpc-timeout", False),
        (b"grpc-retry-pushback-ms", False),
        (b"trace-bin", False),
        (b"x-model-version", True),
        (b"x-request-id", True),
        (b"traceparent", True),
    ],
)
def test_routable_headers(name: bytes, routable: bool) -> None:
    assert policy.routable(name) is routable


def test_routing_metadata_adds_a_request_id_only_when_the_caller_sent_none() -> None:
    made = iter(["id-1", "id-2"])
    text = policy.routing_metadata(HEADERS, lambda: next(made))
    assert text == (("x-model-version", "2"), ("x-tenant", "a"), ("x-request-id", "id-1"))
    kept = policy.routing_metadata([*HEADERS, (b"x-request-id", b"mine")], lambda: next(made))
    assert dict(kept)["x-request-id"] == "mine"
    assert "x-request-id" not in dict(policy.routing_metadata(HEADERS))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"5S", 5.0),
        (b"250m", 0.25),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"100u", 1e-4),
        (b"7n", 7e-9),
        (b"123456789S", None),  # more than 8 digits
        (b"5", None),
        (b"S", None),
        (b"-5S", None),
        (b"5x", None),
    ],
)
def test_parse_timeout(value: bytes, seconds: float | None) -> None:
    assert policy.parse_timeout(value) == (pytest.approx(seconds) if seconds else None)


@pytest.mark.parametrize(
    ("seconds", "value"),
    [(0.25, b"250000u"), (0.0, b"1u"), (-1.0, b"1u"), (150.0, b"150000m"), (1e6, b"1000000S")],
)
def test_format_timeout_rounds_up_in_the_finest_unit(seconds: float, value: bytes) -> None:
    assert policy.format_timeout(seconds) == value
    parsed = policy.parse_timeout(value)
    assert parsed is not None and parsed >= seconds


@pytest.mark.parametrize(
    ("client", "route", "deadline"),
    [
        (None, None, None),
        (5.0, None, 105.0),
        (None, 2.0, 102.0),
        (5.0, 2.0, 102.0),
        (1.0, 3.0, 101.0),
    ],
)
def test_call_deadline_is_the_tighter_budget(
    client: float | None, route: float | None, deadline: float | None
) -> None:
    assert policy.call_deadline(100.0, client, route) == deadline


@pytest.mark.parametrize(
    ("deadline", "now", "per_try", "budget"),
    [
        (None, 10.0, None, None),
        (None, 10.0, 1.5, 1.5),
        (15.0, 10.0, None, 5.0),
        (15.0, 10.0, 1.5, 1.5),
        (11.0, 10.0, 1.5, 1.0),
        (9.0, 10.0, 1.5, -1.0),  # out of time: the caller gives up
    ],
)
def test_attempt_budget(
    deadline: float | None, now: float, per_try: float | None, budget: float | None
) -> None:
    assert policy.attempt_budget(deadline, now, per_try) == budget


def test_client_timeout() -> None:
    assert policy.client_timeout(HEADERS) == 5.0
    assert policy.client_timeout(HEADERS[:2]) is None


@pytest.mark.parametrize(
    ("limit", "in_flight", "shed"),
    [(UNLIMITED, 10**9, False), (2, 1, False), (2, 2, True), (2, 3, True), (0, 0, True)],
)
def test_http2_max_requests(limit: int, in_flight: int, shed: bool) -> None:
    assert policy.over_request_limit(limit, in_flight) is shed


DEFAULT = RetryPolicy()
CODES_ONLY = RetryPolicy(attempts=3, retry_on=frozenset({"unavailable"}))
NONE = RetryPolicy(attempts=0)


@pytest.mark.parametrize(
    ("retries", "attempt", "idempotent", "only", "code", "connection", "retry"),
    [
        (DEFAULT, 0, True, False, U, False, True),
        # Envoy retries any method retryOn covers (Istio's default) ...
        (DEFAULT, 0, False, False, U, False, True),
        # ... unless the destination retries only idempotent ones: the upstream may have run it.
        (DEFAULT, 0, False, True, U, False, False),
        (DEFAULT, 0, True, True, U, False, True),
        (DEFAULT, 0, False, True, U, True, True),  # it never saw the call
        (DEFAULT, 1, True, False, U, False, True),
        (DEFAULT, 2, True, False, U, False, False),  # attempts spent
        (DEFAULT, 0, True, False, grpc.StatusCode.INTERNAL, False, False),
        # A gRPC status token matches an upstream's answer; a connection failure had none.
        (CODES_ONLY, 0, False, False, U, True, False),
        (CODES_ONLY, 0, True, False, U, True, False),
        (CODES_ONLY, 2, True, False, U, False, True),
        (NONE, 0, True, False, U, True, False),
    ],
)
def test_may_retry(
    retries: RetryPolicy,
    attempt: int,
    idempotent: bool,
    only: bool,
    code: grpc.StatusCode,
    connection: bool,
    retry: bool,
) -> None:
    """Istio's budget is attempts alone: with one endpoint a retry reuses it (Envoy's
    previous-hosts predicate avoids tried hosts only while another is left)."""
    assert (
        policy.may_retry(
            retries,
            attempt=attempt,
            idempotent=idempotent,
            code=code,
            connection_failure=connection,
            idempotent_only=only,
        )
        is retry
    )


def test_a_call_keeps_the_callers_request_id_or_gets_a_new_one() -> None:
    made = iter(["new-1"])
    assert policy.request_id([*HEADERS, (b"x-request-id", b"mine")], lambda: "unused") == "mine"
    assert policy.request_id(HEADERS, lambda: next(made)) == "new-1"


def test_a_response_block_carries_the_calls_id_in_place_of_any_other() -> None:
    block = [(b":status", b"200"), (b"x-request-id", b"upstream's"), (b"x-worker", b"w0")]
    assert policy.with_request_id(block, "r-1") == [
        (b":status", b"200"),
        (b"x-worker", b"w0"),
        (b"x-request-id", b"r-1"),
    ]
    trailers_only = [(b":status", b"200"), (b"grpc-status", b"14")]
    assert policy.with_request_id(trailers_only, "r-2")[-1] == (b"x-request-id", b"r-2")


@pytest.mark.parametrize(("retry", "ceiling"), [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25)])
def test_retry_backoff_is_envoys_jittered_exponential(retry: int, ceiling: float) -> None:
    rng = random.Random(7)
    waits = [policy.retry_backoff(retry, rng) for _ in range(2000)]
    assert all(0.0 <= w < ceiling for w in waits)
    # Fully jittered: spread over the whole interval, not bunched at its top.
    assert min(waits) < ceiling * 0.05 and max(waits) > ceiling * 0.95
