"""Envoy's circuit breakers as connectionPool sets them (mesh/routing/circuit.py), as tables."""

from __future__ import annotations

import pytest

from mesh.config.destination_rule import UNLIMITED, ConnectionPool
from mesh.routing import circuit
from mesh.routing.circuit import CircuitBreakers

DEFAULT = ConnectionPool()


@pytest.mark.parametrize(
    ("pool", "peer_max", "open_streams", "opened", "room"),
    [
        # Istio's defaults: only the peer's SETTINGS_MAX_CONCURRENT_STREAMS bounds it.
        (DEFAULT, 100, 0, 10**6, 100),
        (DEFAULT, 100, 100, 0, 0),
        # maxRequestsPerConnection counts streams carried, open or ended.
        (ConnectionPool(max_requests_per_connection=2), 100, 0, 0, 2),
        (ConnectionPool(max_requests_per_connection=2), 100, 1, 1, 1),
        (ConnectionPool(max_requests_per_connection=2), 100, 0, 2, 0),
        # Whichever is tighter.
        (ConnectionPool(max_requests_per_connection=10), 1, 1, 1, 0),
        (ConnectionPool(max_requests_per_connection=10), 3, 0, 8, 2),
    ],
)
def test_stream_room(
    pool: ConnectionPool, peer_max: int, open_streams: int, opened: int, room: int
) -> None:
    assert circuit.stream_room(pool, peer_max, open_streams, opened) == room


@pytest.mark.parametrize(
    ("limit", "opened", "spent"),
    [(UNLIMITED, 10**9, False), (1, 0, False), (1, 1, True), (3, 2, False), (3, 3, True)],
)
def test_a_connection_is_spent_at_max_requests_per_connection(
    limit: int, opened: int, spent: bool
) -> None:
    assert circuit.spent(ConnectionPool(max_requests_per_connection=limit), opened) is spent


@pytest.mark.parametrize(
    ("limit", "open_before", "host_has_connection", "opened", "overflow"),
    [
        (UNLIMITED, 10**6, True, True, 0),
        (2, 1, True, True, 0),
        # At the limit a host that has a connection waits for room on it...
        (2, 2, True, False, 1),
        # ...and one with none still gets one (Envoy), counted as an overflow.
        (2, 2, False, True, 1),
    ],
)
def test_max_connections(
    limit: int, open_before: int, host_has_connection: bool, opened: bool, overflow: int
) -> None:
    breakers = CircuitBreakers(connections=open_before)
    pool = ConnectionPool(max_connections=limit)
    assert breakers.open_connection(pool, host_has_connection=host_has_connection) is opened
    assert breakers.connections == open_before + int(opened)
    assert breakers.overflows[circuit.CONNECTIONS] == overflow


def test_a_woken_call_asking_again_is_not_another_overflow() -> None:
    breakers = CircuitBreakers(connections=1)
    pool = ConnectionPool(max_connections=1)
    assert not breakers.open_connection(pool, host_has_connection=True, count=False)
    assert breakers.overflows[circuit.CONNECTIONS] == 0
    breakers.close_connection()
    assert breakers.open_connection(pool, host_has_connection=True, count=False)


def test_pending_calls_past_the_limit_are_shed_and_counted() -> None:
    breakers = CircuitBreakers()
    pool = ConnectionPool(max_pending_requests=2)
    assert [breakers.add_pending(pool) for _ in range(4)] == [True, True, False, False]
    assert (breakers.pending, breakers.overflows[circuit.PENDING]) == (2, 2)
    breakers.remove_pending()
    assert breakers.add_pending(pool)  # a place freed is a place taken
    for _ in range(5):
        breakers.remove_pending()
    assert breakers.pending == 0  # never below zero


def test_retries_outstanding_at_once() -> None:
    breakers = CircuitBreakers()
    pool = ConnectionPool(max_retries=1)
    assert breakers.start_retry(pool)
    assert not breakers.start_retry(pool)
    assert breakers.overflows[circuit.RETRIES] == 1
    breakers.end_retry()  # that retry's attempt ended: the place is free again
    assert breakers.start_retry(pool)
    assert all(CircuitBreakers().start_retry(DEFAULT) for _ in range(1000))


def test_limits_text_names_only_what_is_set() -> None:
    assert circuit.limits_text(DEFAULT) == ""
    text = circuit.limits_text(ConnectionPool(max_connections=1, max_retries=2))
    assert text == "maxConnections=1, maxRetries=2"
