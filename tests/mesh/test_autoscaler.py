"""The autoscaling policy, table-tested with an explicit clock; and its annotations."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh.config.autoscale import AutoscaleSettings
from mesh.config.destination_rule import DestinationRule
from mesh.config.fields import ConfigError
from mesh.scaling.autoscaler import Autoscaler, Bounds, Candidate, least_loaded
from tests.mesh.test_config import dr_yaml, one

#: target 10 per replica; Knative's windows (60 s, 6 s, 200 %); the HPA's (0 s up, 300 s down).
BASE = AutoscaleSettings(target=10.0)


def steady(load: float, start: int, end: int) -> list[tuple[float, float]]:
    """One sample a second (a sidecar heartbeat), ``start`` to ``end`` inclusive."""
    return [(float(t), load) for t in range(start, end + 1)]


@pytest.mark.parametrize(
    ("case", "settings", "bounds", "samples", "current", "desired", "panic"),
    [
        ("no load: the minimum", BASE, "1:4", [], 1, 1, False),
        ("no load, min 2", BASE, "2:4", [], 2, 2, False),
        ("ceil(load / target)", BASE, "1:8", steady(25, 0, 59), 3, 3, False),
        ("scale up at once (up window 0 s)", BASE, "1:8", steady(25, 0, 59), 2, 3, False),
        ("never above max, even in panic", BASE, "1:4", steady(100, 0, 59), 4, 4, True),
        (
            # The stable window alone would ask for ceil(11.25 / 10) = 2; the last 6 s ask
            # for 6 = 6 x the one replica, past 200 %: panic, scale on the burst.
            "a burst panics and scales on the panic window",
            BASE,
            "1:4",
            steady(5, 0, 54) + steady(80, 55, 59),
            1,
            4,
            True,
        ),
        (
            "a rise under the panic threshold scales on the stable window",
            BASE,
            "1:8",
            steady(15, 0, 59),
            1,
            2,
            False,
        ),
        (
            "the stable window averages a short spike away when it does not panic",
            replace(BASE, panic_threshold=10.0),
            "1:8",
            steady(0, 0, 56) + steady(60, 57, 59),
            1,
            1,
            False,
        ),
        (
            "scale down waits for the scale-down window's highest recommendation",
            BASE,
            "1:8",
            steady(40, 0, 59) + steady(0, 60, 200),
            4,
            4,
            False,
        ),
    ],
)
def test_decisions(
    case: str,
    settings: AutoscaleSettings,
    bounds: str,
    samples: list[tuple[float, float]],
    current: int,
    desired: int,
    panic: bool,
) -> None:
    scaler = Autoscaler(settings, Bounds.parse(bounds))
    for at, load in samples:
        scaler.observe(at, load)
        scaler.decide(at, current)
    now = samples[-1][0] if samples else 0.0
    decision = scaler.decide(now, current)
    assert (decision.desired, decision.panic) == (desired, panic), case


def run(
    scaler: Autoscaler, loads: list[tuple[float, float]], current: int
) -> list[tuple[float, int]]:
    """Feeds samples and follows the decisions as an engine would; (time, replicas)."""
    trace = []
    for at, load in loads:
        scaler.observe(at, load)
        current = scaler.decide(at, current).desired
        trace.append((at, current))
    return trace


def replicas_at(trace: list[tuple[float, int]], at: float) -> int:
    return next(n for t, n in trace if t == at)


def test_scales_down_only_after_the_scale_down_window() -> None:
    scaler = Autoscaler(BASE, Bounds(1, 4))
    trace = run(scaler, steady(40, 0, 59) + steady(0, 60, 600), current=1)
    assert replicas_at(trace, 0) == 4  # a burst from nothing: panic, at once
    # The stable window lets the 4-replica ask last until t~75 (1 replica from t~105); the HPA's
    # 300 s window keeps it for 300 s after that.
    assert replicas_at(trace, 370) == 4
    assert replicas_at(trace, 420) == 1
    # Never a step up on the way down.
    downs = [n for t, n in trace if t >= 60]
    assert downs == sorted(downs, reverse=True)


def test_panic_never_scales_down_until_a_stable_window_without_bursts() -> None:
    settings = replace(BASE, scale_down_stabilization_s=0.0)
    scaler = Autoscaler(settings, Bounds(1, 4))
    trace = run(scaler, steady(0, 0, 30) + steady(80, 31, 33) + steady(0, 34, 200), current=1)
    # The 6 s average passes 2 x 1 replica at the second burst sample: panic, 3 replicas;
    # the third asks for 4.
    assert [replicas_at(trace, t) for t in (31, 32, 33)] == [1, 3, 4]
    # Panic holds them for a stable window (60 s) after it began, though the load is gone...
    assert all(n == 4 for t, n in trace if 33 <= t < 32 + 60)
    # ...then the stable window (the burst aged out of it) lets them go at once (0 s window).
    assert replicas_at(trace, 200) == 1


def test_a_scale_up_window_waits_for_a_lasting_rise() -> None:
    settings = replace(BASE, scale_up_stabilization_s=10.0, panic_threshold=10.0)
    scaler = Autoscaler(settings, Bounds(1, 8))
    trace = run(scaler, steady(0, 0, 59) + steady(30, 60, 200), current=1)
    # The stable average passes 10 at ~t=80 (a 2-replica ask) and must hold for 10 s.
    first_two = min(t for t, n in trace if n >= 2)
    assert 85 <= first_two <= 95
    assert replicas_at(trace, 200) == 3


def test_least_loaded_stops_the_idlest_and_newest_first() -> None:
    candidates = [
        Candidate("inference worker 1", load=3, started=1),
        Candidate("inference worker 2", load=0, started=2),
        Candidate("inference worker 3", load=0, started=3),
        Candidate("inference worker 4", load=9, started=4),
    ]
    assert least_loaded(candidates, 1) == ["inference worker 3"]
    assert least_loaded(candidates, 3) == [
        "inference worker 3",
        "inference worker 2",
        "inference worker 1",
    ]
    assert least_loaded(candidates, 0) == []


@pytest.mark.parametrize(
    ("text", "bounds"), [("1:4", Bounds(1, 4)), ("3", Bounds(3, 3)), ("0:2", Bounds(0, 2))]
)
def test_bounds_parse(text: str, bounds: Bounds) -> None:
    assert Bounds.parse(text) == bounds


@pytest.mark.parametrize("text", ["4:1", "a:b", "0:0", "-1:2"])
def test_bad_bounds_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"MIN:MAX|min <= max"):
        Bounds.parse(text)


def test_annotations_set_the_policy_and_defaults_are_knatives_and_the_hpas() -> None:
    plain = one(dr_yaml("host: inference"))
    assert isinstance(plain, DestinationRule)
    assert plain.extensions.autoscale == AutoscaleSettings(
        target=16.0,
        window_s=60.0,
        panic_window_s=6.0,
        panic_threshold=2.0,
        scale_up_stabilization_s=0.0,
        scale_down_stabilization_s=300.0,
    )
    dr = one(
        dr_yaml(
            "host: inference",
            annotations="""
            meshserve.io/autoscale-target: "8"
            meshserve.io/autoscale-window: "20s"
            meshserve.io/autoscale-panic-window: "2s"
            meshserve.io/autoscale-panic-threshold-percentage: "150"
            meshserve.io/autoscale-scale-up-stabilization: "1s"
            meshserve.io/autoscale-scale-down-stabilization: "1m"
            """,
        )
    )
    assert isinstance(dr, DestinationRule)
    assert dr.extensions.autoscale == AutoscaleSettings(8.0, 20.0, 2.0, 1.5, 1.0, 60.0)


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (
            'meshserve.io/autoscale-target: "0"',
            "meshserve.io/autoscale-target: must be a number in [0.01, 1e+06]",
        ),
        (
            'meshserve.io/autoscale-window: "soon"',
            'meshserve.io/autoscale-window: must be a duration such as "60s"',
        ),
        (
            'meshserve.io/autoscale-panic-window: "90s"',
            "meshserve.io/autoscale-panic-window: must not be longer than "
            "meshserve.io/autoscale-window (60 s)",
        ),
        (
            'meshserve.io/autoscale-panic-threshold-percentage: "100"',
            "meshserve.io/autoscale-panic-threshold-percentage: must be a number in [110, 1000]",
        ),
        (
            'meshserve.io/autoscale-max: "4"',
            "meshserve.io/autoscale-max: unknown meshserve annotation",
        ),
    ],
)
def test_bad_annotations_are_refused_by_name(annotation: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        one(dr_yaml("host: inference", annotations=annotation))
    assert message in caught.value.message
