"""ROUND_ROBIN, RANDOM and LEAST_REQUEST (power of two choices) with an injected RNG."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.balance.endpoints import Endpoint
from mesh.balance.load import LoadTracker
from mesh.balance.simple import RoundRobin, least_request_order, random_order

A, B, C = Endpoint("a:1"), Endpoint("b:1"), Endpoint("c:1")


def test_round_robin_cycles_and_weights_interleave() -> None:
    rr = RoundRobin([A, B, C])
    assert [rr.order()[0].address for _ in range(6)] == ["a:1", "b:1", "c:1"] * 2
    heavy = Endpoint("h:1", weight=3)
    weighted = RoundRobin([heavy, A])
    firsts = [weighted.order()[0].address for _ in range(8)]
    assert Counter(firsts) == {"h:1": 6, "a:1": 2}
    assert "h:1,h:1,h:1,h:1" not in ",".join(firsts)  # smooth: no bursts of four


def test_round_robin_skips_excluded_and_orders_the_rest_for_retries() -> None:
    rr = RoundRobin([A, B, C])
    order = rr.order(frozenset({"a:1"}))
    assert [e.address for e in order] in (["b:1", "c:1"], ["c:1", "b:1"])
    assert rr.order(frozenset({"a:1", "b:1", "c:1"})) == []


def test_random_follows_weights_and_lists_everyone() -> None:
    rng = random.Random(2)
    heavy = Endpoint("h:1", weight=4)
    firsts = Counter(random_order([heavy, A], rng)[0].address for _ in range(10000))
    assert firsts["h:1"] / 10000 == pytest.approx(0.8, abs=0.02)
    assert sorted(e.address for e in random_order([A, B, C], rng)) == ["a:1", "b:1", "c:1"]


def test_least_request_prefers_the_less_loaded_of_two() -> None:
    tracker = LoadTracker()
    for _ in range(10):
        tracker.start("a:1")
    rng = random.Random(4)
    firsts = Counter(least_request_order([A, B, C], rng, tracker)[0].address for _ in range(3000))
    # Any pair that contains A has a less loaded other member, so A never goes first.
    assert firsts["a:1"] == 0
    assert firsts["b:1"] > 1200 and firsts["c:1"] > 1200


def test_least_request_retry_order_is_by_load() -> None:
    tracker = LoadTracker()
    tracker.start("c:1")
    order = least_request_order([A, B, C], random.Random(0), tracker)
    assert order[-1].address == "c:1"  # never first (any pair has a less loaded one), last by load
    assert sorted(e.address for e in order) == ["a:1", "b:1", "c:1"]
    assert least_request_order([A], random.Random(0), tracker) == [A]


def test_load_tracker_counts_and_cleans_up() -> None:
    tracker = LoadTracker()
    with tracker.track("a:1", "k"):
        assert tracker.in_flight("a:1") == 1 and tracker.key_in_flight("k") == 1
    assert tracker.in_flight("a:1") == 0 and tracker.key_in_flight("k") == 0
    assert tracker.total(["a:1", "b:1"]) == 0
