"""Pure tests: leases are judged on a clock that stands still while the store is down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from registry.lease_clock import LeaseClock

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def test_without_outages_it_is_the_wall_clock() -> None:
    clock = LeaseClock()
    assert clock.judge_at(T0) == T0
    clock.read_succeeded(T0)
    assert clock.judge_at(T0 + s(3)) == T0 + s(3)


def test_an_outage_is_forgiven_then_caught_up_at_double_speed() -> None:
    clock = LeaseClock()
    clock.read_succeeded(T0)
    for t in (1, 2, 5):
        clock.read_failed()
        assert clock.judge_at(T0 + s(t)) == T0  # stood still since the last good read
    recovered = T0 + s(10)
    assert clock.judge_at(recovered) == T0
    clock.read_succeeded(recovered)
    assert clock.judge_at(recovered) == T0
    assert clock.judge_at(recovered + s(4)) == T0 + s(8)  # 2x: 8 s of lease time in 4 s
    assert clock.judge_at(recovered + s(10)) == recovered + s(10)  # caught up
    assert clock.judge_at(recovered + s(20)) == recovered + s(20)


def test_credit_is_capped() -> None:
    clock = LeaseClock(max_credit=s(30))
    clock.read_succeeded(T0)
    clock.read_failed()
    assert clock.judge_at(T0 + s(100)) == T0 + s(70)
    clock.read_succeeded(T0 + s(100))
    assert clock.judge_at(T0 + s(130)) == T0 + s(130)


def test_failures_before_any_good_read_use_the_wall_clock() -> None:
    clock = LeaseClock()
    clock.read_failed()
    assert clock.judge_at(T0) == T0
