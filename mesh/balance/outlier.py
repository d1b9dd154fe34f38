"""Outlier detection: eject endpoints after consecutive errors, with an injected clock."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc

from mesh.config.destination_rule import MAX_EJECTION_TIME, OutlierDetection

#: gRPC statuses that count as a "5xx" for consecutive5xxErrors: those Envoy's gRPC→HTTP
#: mapping turns into a 5xx (DEADLINE_EXCEEDED is 504 there).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
#: Statuses that count as gateway errors (HTTP 502/503/504) for consecutiveGatewayErrors;
#: connection failures count too.
GATEWAY_ERRORS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass
class _State:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    #: Ejections that still multiply the ejection time (decays while healthy).
    ejections: int = 0
    ejected_until: float | None = None
    #: Since when the endpoint has been back in service (for the decay).
    healthy_since: float = 0.0


@dataclass(frozen=True)
class OutlierState:
    """What the admin API shows for one endpoint."""

    ejected: bool
    ejected_until: float | None
    ejection_count: int
    consecutive_errors: int


class OutlierDetector:
    """Envoy's consecutive-errors detection for one host/subset, evaluated lazily.

    An endpoint is ejected as soon as it reaches ``consecutive5xxErrors`` (or
    ``consecutiveGatewayErrors``) failures in a row, unless ``maxEjectionPercent`` of the
    pool is already out. It stays out ``baseEjectionTime * ejections`` (capped at 300 s),
    and each ``interval`` it then spends in service takes one off its ejection count, so
    a flapping endpoint stays out longer and a recovered one is forgiven. Time only moves
    when the injected ``clock`` says so: no timers, exact under a fake clock.
    """

    def __init__(self, policy: OutlierDetection, clock: Callable[[], float]) -> None:
        self.policy = policy
        self._clock = clock
        self._states: dict[str, _State] = {}

    def _state(self, address: str) -> _State:
        state = self._states.get(address)
        if state is None:
            state = self._states[address] = _State(healthy_since=self._clock())
        return state

    def _refresh(self, state: _State, now: float) -> None:
        if state.ejected_until is not None and now >= state.ejected_until:
            state.healthy_since = state.ejected_until
            state.ejected_until = None
        if state.ejected_until is None and state.ejections:
            intervals = math.floor((now - state.healthy_since) / self.policy.interval)
            if intervals > 0:
                state.ejections = max(0, state.ejections - intervals)
                state.healthy_since += intervals * self.policy.interval

    def is_ejected(self, address: str) -> bool:
        state = self._states.get(address)
        if state is None:
            return False
        self._refresh(state, self._clock())
        return state.ejected_until is not None

    def record(
        self,
        address: str,
        code: grpc.StatusCode,
        pool: Collection[str],
        *,
        connection_failure: bool = False,
    ) -> bool:
        """Feeds one call's outcome; returns True when this outcome ejected ``address``.

        ``pool`` is every endpoint of the host/subset, for the ejection-percent limit.
        """
        success = code is grpc.StatusCode.OK and not connection_failure
        if success and address not in self._states:
            return False  # the common case: nothing to reset, no state to create
        now = self._clock()
        state = self._state(address)
        self._refresh(state, now)
        if success:
            state.consecutive_5xx = state.consecutive_gateway = 0
            return False
        if code in SERVER_ERRORS or connection_failure:
            state.consecutive_5xx += 1
        else:
            state.consecutive_5xx = 0
        if code in GATEWAY_ERRORS or connection_failure:
            state.consecutive_gateway += 1
        else:
            state.consecutive_gateway = 0
        if state.ejected_until is not None:
            return False
        p = self.policy
        tripped = (
            p.consecutive_5xx_errors and state.consecutive_5xx >= p.consecutive_5xx_errors
        ) or (
            p.consecutive_gateway_errors
            and state.consecutive_gateway >= p.consecutive_gateway_errors
        )
        if not tripped or not self._may_eject(pool):
            return False
        state.ejections += 1
        duration = min(
            p.base_ejection_time * state.ejections, max(p.base_ejection_time, MAX_EJECTION_TIME)
        )
        state.ejected_until = now + duration
        state.consecutive_5xx = state.consecutive_gateway = 0
        return True

    def _may_eject(self, pool: Collection[str]) -> bool:
        # Envoy's rule: eject while the share already out is below the limit.
        if not pool:
            return False
        out = sum(1 for a in pool if self.is_ejected(a))
        return 100.0 * out / len(pool) < self.policy.max_ejection_percent

    def excluded(self, pool: Collection[str]) -> frozenset[str]:
        """The ejected members of ``pool`` to skip, or none when in panic.

        Panic (``minHealthPercent``): when fewer than that share of the pool is in
        service, ejections are ignored and traffic spreads over every endpoint.
        """
        if not self._states:
            return frozenset()
        ejected = frozenset(a for a in pool if self.is_ejected(a))
        if not ejected:
            return ejected
        in_service = len(pool) - len(ejected)
        if 100.0 * in_service / len(pool) < self.policy.min_health_percent:
            return frozenset()
        return ejected

    def state(self, address: str) -> OutlierState:
        state = self._states.get(address)
        if state is None:
            return OutlierState(False, None, 0, 0)
        self._refresh(state, self._clock())
        return OutlierState(
            ejected=state.ejected_until is not None,
            ejected_until=state.ejected_until,
            ejection_count=state.ejections,
            consecutive_errors=max(state.consecutive_5xx, state.consecutive_gateway),
        )

    def forget(self, keep: Collection[str]) -> None:
        """Drops the state of endpoints that left the pool."""
        for address in [a for a in self._states if a not in keep]:
            del self._states[address]
