"""Outlier detection timing under a fake clock: ejection, growth, decay, limits, panic."""

from __future__ import annotations

import grpc
import pytest

from mesh.balance.outlier import OutlierDetector
from mesh.config.destination_rule import OutlierDetection

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
OK = grpc.StatusCode.OK
POOL = ("a", "b", "c", "d")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(**kwargs: int | float) -> tuple[OutlierDetector, FakeClock]:
    clock = FakeClock()
    policy = OutlierDetection(**{"max_ejection_percent": 100, **kwargs})  # type: ignore[arg-type]
    return OutlierDetector(policy, clock), clock


def fail(
    d: OutlierDetector, address: str, times: int, code: grpc.StatusCode = UNAVAILABLE
) -> list[bool]:
    return [d.record(address, code, POOL) for _ in range(times)]


@pytest.mark.parametrize(
    ("code", "ejects"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.INTERNAL, True),
        (grpc.StatusCode.UNKNOWN, True),
        (grpc.StatusCode.DATA_LOSS, True),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
        # Envoy's gRPC→HTTP mapping makes it a 504: a 5xx.
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
    ],
)
def test_which_statuses_count_as_5xx(code: grpc.StatusCode, ejects: bool) -> None:
    d, _ = detector(consecutive_5xx_errors=3)
    assert fail(d, "a", 3, code)[-1] is ejects
    assert d.is_ejected("a") is ejects


def test_ejects_on_the_nth_consecutive_error_and_success_resets() -> None:
    d, _ = detector(consecutive_5xx_errors=3)
    assert fail(d, "a", 2) == [False, False]
    d.record("a", OK, POOL)
    assert fail(d, "a", 2) == [False, False]
    assert fail(d, "a", 1) == [True]
    assert d.state("a").ejected and d.state("a").ejection_count == 1


def test_ejection_time_grows_with_each_ejection_and_ends_on_time() -> None:
    d, clock = detector(consecutive_5xx_errors=1, base_ejection_time=30, interval=10)
    fail(d, "a", 1)
    assert d.state("a").ejected_until == 1030.0
    clock.now = 1029.9
    assert d.is_ejected("a")
    clock.now = 1030.0
    assert not d.is_ejected("a")
    fail(d, "a", 1)  # second ejection right away: 2 x 30 s
    assert d.state("a").ejected_until == 1090.0
    clock.now = 1090.0
    assert not d.is_ejected("a")
    fail(d, "a", 1)  # third: 90 s
    assert d.state("a").ejected_until == 1180.0


def test_ejection_count_decays_one_per_healthy_interval() -> None:
    d, clock = detector(consecutive_5xx_errors=1, base_ejection_time=30, interval=10)
    fail(d, "a", 1)
    clock.now = 1030.0
    fail(d, "a", 1)  # count 2, out until 1090
    clock.now = 1090.0 + 10.0  # one healthy interval after coming back
    assert d.state("a").ejection_count == 1
    clock.now = 1090.0 + 25.0
    assert d.state("a").ejection_count == 0
    fail(d, "a", 1)
    assert d.state("a").ejected_until == clock.now + 30.0


def test_ejection_time_is_capped_at_300_seconds() -> None:
    d, clock = detector(consecutive_5xx_errors=1, base_ejection_time=100, interval=1000)
    for _ in range(5):
        fail(d, "a", 1)
        until = d.state("a").ejected_until
        assert until is not None
        clock.now = until
    assert d.state("a").ejection_count == 5
    fail(d, "a", 1)
    assert d.state("a").ejected_until == clock.now + 300.0


def test_max_ejection_percent_limits_how_many_are_out() -> None:
    d, _ = detector(consecutive_5xx_errors=1, max_ejection_percent=50)
    assert fail(d, "a", 1) == [True]  # 0% out < 50%
    assert fail(d, "b", 1) == [True]  # 25% out < 50%
    assert fail(d, "c", 1) == [False]  # 50% out: no more
    assert d.excluded(POOL) == {"a", "b"}


def test_istio_default_ten_percent_still_ejects_one_of_three() -> None:
    clock = FakeClock()
    d = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1), clock)
    assert d.record("a", UNAVAILABLE, ("a", "b", "c"))
    assert not d.record("b", UNAVAILABLE, ("a", "b", "c"))


def test_min_health_percent_panics_and_ignores_ejections() -> None:
    d, _ = detector(consecutive_5xx_errors=1, min_health_percent=60)
    fail(d, "a", 1)
    assert d.excluded(POOL) == {"a"}  # 75% in service >= 60%
    fail(d, "b", 1)
    assert d.excluded(POOL) == frozenset()  # 50% < 60%: panic, use everything


def test_gateway_errors_count_separately() -> None:
    d, _ = detector(consecutive_5xx_errors=0, consecutive_gateway_errors=2)
    assert fail(d, "a", 2, grpc.StatusCode.INTERNAL) == [False, False]  # not a gateway error
    assert fail(d, "a", 2, grpc.StatusCode.DEADLINE_EXCEEDED) == [False, True]
    assert d.record("b", OK, POOL, connection_failure=True) is False
    assert d.record("b", OK, POOL, connection_failure=True) is True


def test_disabled_thresholds_never_eject() -> None:
    d, _ = detector(consecutive_5xx_errors=0)
    assert not any(fail(d, "a", 50))


def test_forget_drops_departed_endpoints() -> None:
    d, _ = detector(consecutive_5xx_errors=1)
    fail(d, "a", 1)
    d.forget(("b",))
    assert not d.is_ejected("a") and d.state("a").ejection_count == 0
