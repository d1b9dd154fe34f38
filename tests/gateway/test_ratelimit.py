"""Token buckets on a fake clock."""

from __future__ import annotations

import math

import pytest

from gateway.ratelimit import RateLimit, RateLimiter, TokenBucket
from mesh.errors import InvalidArgument


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# (advance seconds before the take, expected wait): rate 2/s, burst 3.
STEPS = [
    (0.0, 0.0),
    (0.0, 0.0),
    (0.0, 0.0),
    (0.0, 0.5),  # empty: one token takes 1/2 s
    (0.25, 0.25),  # half a token refilled: a quarter second more
    (0.25, 0.0),  # one whole token now
    (10.0, 0.0),  # refills to the burst, not beyond
    (0.0, 0.0),
    (0.0, 0.0),
    (0.0, 0.5),
    (-5.0, 0.5),  # a clock that steps back mints nothing
]


def test_bucket_sequence() -> None:
    clock = Clock()
    bucket = TokenBucket(RateLimit(2.0, 3), clock)
    for i, (advance, wait) in enumerate(STEPS):
        clock.now += advance
        assert bucket.take() == pytest.approx(wait), f"step {i}"


def test_cost_above_burst_never_passes() -> None:
    bucket = TokenBucket(RateLimit(1.0, 2), Clock())
    assert bucket.take(3) == math.inf
    assert bucket.take(2) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.nan, 1), (1.0, 0)])
def test_limits_are_validated(rate: float, burst: int) -> None:
    with pytest.raises(InvalidArgument):
        RateLimit(rate, burst)


def test_limiter_keeps_clients_apart_and_honours_overrides() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimit(1.0, 1), {"vip": RateLimit(10.0, 5)}, clock=clock)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0.0
    assert [limiter.take("vip") for _ in range(6)] == [0.0] * 5 + [pytest.approx(0.1)]


def test_limiter_without_default_is_unlimited() -> None:
    limiter = RateLimiter(None, clock=Clock())
    assert all(limiter.take("x") == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_limiter_bounds_its_buckets_dropping_idle_ones_first() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimit(1.0, 1), clock=clock, max_clients=2)
    limiter.take("busy")
    limiter.take("idle")
    clock.now += 5  # both refill
    limiter.take("busy")  # busy is empty again, idle is full
    limiter.take("new")
    assert len(limiter) == 2
    # busy's empty bucket survived the eviction: it still has to wait.
    assert limiter.take("busy") == pytest.approx(1.0)
