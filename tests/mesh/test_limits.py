"""Per-source limits and the abuse cool-off, under a fake clock."""

from __future__ import annotations

import pytest

from mesh.routing.limits import RelayLimits, SourceLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_connections_per_source_are_limited_and_released() -> None:
    limiter = SourceLimiter(RelayLimits(max_connections_per_source=2), Clock())
    assert limiter.admit_connection("a") is None
    assert limiter.admit_connection("a") is None
    refused = limiter.admit_connection("a")
    assert refused is not None and "2 connections" in refused
    assert limiter.admit_connection("b") is None  # another source is not affected
    limiter.release_connection("a")
    assert limiter.admit_connection("a") is None
    assert limiter.refused == {"connections": 1}


def test_streams_are_limited_per_source_and_in_all() -> None:
    limiter = SourceLimiter(RelayLimits(max_streams_per_source=2, max_streams=3), Clock())
    assert limiter.admit_stream("a") is None
    assert limiter.admit_stream("a") is None
    assert limiter.admit_stream("a") is not None  # per source
    assert limiter.admit_stream("b") is None
    assert limiter.admit_stream("c") is not None  # the global budget
    limiter.release_stream("a")
    assert limiter.admit_stream("c") is None
    assert limiter.total_streams == 3
    for source in ("a", "b", "c"):
        limiter.release_stream(source)
    assert limiter.total_streams == 0 and limiter.streams == {}


def test_zero_means_unlimited() -> None:
    limiter = SourceLimiter(
        RelayLimits(max_connections_per_source=0, max_streams_per_source=0, max_streams=0),
        Clock(),
    )
    for _ in range(10_000):
        assert limiter.admit_stream("a") is None
        assert limiter.admit_connection("a") is None


def test_an_abusive_source_cools_off_and_is_forgiven() -> None:
    clock = Clock()
    limiter = SourceLimiter(RelayLimits(abuse_cool_off=30), clock)
    limiter.penalize("a")
    refused = limiter.admit_connection("a")
    assert refused is not None and "cooling off" in refused
    assert limiter.admit_connection("b") is None
    clock.now += 29.9
    assert limiter.admit_connection("a") is not None
    clock.now += 0.2
    assert limiter.admit_connection("a") is None
    assert limiter.refused == {"cool_off": 2}


@pytest.mark.parametrize(
    "bad",
    [
        {"stream_idle_timeout": -1},
        {"max_streams": -5},
        {"idle_timeout": "1h"},
        {"max_source_share": 1.5},
    ],
)
def test_limits_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RelayLimits(**bad)  # type: ignore[arg-type]


def test_the_tick_follows_the_shortest_timeout() -> None:
    assert RelayLimits().tick == 1.0
    assert RelayLimits(stream_idle_timeout=0.4).tick == pytest.approx(0.1)
    assert RelayLimits(request_headers_timeout=0, stream_idle_timeout=0).tick == 1.0


def _holding(limiter: SourceLimiter, source: str, streams: int) -> None:
    for _ in range(streams):
        assert limiter.admit_stream(source) is None


# (held by the source before this call, in flight at the destination, refused?)
@pytest.mark.parametrize(
    ("held", "in_flight", "refused"),
    [
        (2, 2, False),  # under the cap (ceil(4 x 0.75) = 3)
        (3, 3, True),  # at the cap, and the destination that full
        (3, 2, False),  # its streams are elsewhere: the destination has room
        (1, 3, False),  # others fill the destination: this source is under its share
    ],
)
def test_a_source_holds_at_most_its_share_of_a_full_destination(
    held: int, in_flight: int, refused: bool
) -> None:
    limiter = SourceLimiter(RelayLimits(max_source_share=0.75), Clock())
    _holding(limiter, "a", held + 1)  # this call's own stream is open already
    why = limiter.over_share("a", 4, in_flight)
    assert (why is not None) is refused
    if refused:
        assert why is not None and "a holds 3 calls" in why and "at most 3 of" in why
        assert limiter.refused == {"source_share": 1}


def test_a_client_alone_still_reaches_a_small_limit_and_zero_turns_the_share_off() -> None:
    limiter = SourceLimiter(RelayLimits(), Clock())
    _holding(limiter, "a", 2)
    assert limiter.over_share("a", 2, 1) is None  # ceil(2 x 0.75) = 2: both calls
    off = SourceLimiter(RelayLimits(max_source_share=0), Clock())
    _holding(off, "a", 100)
    assert off.over_share("a", 4, 3) is None


def test_handshakes_are_counted_per_source_until_released() -> None:
    limiter = SourceLimiter(RelayLimits(max_connections_per_source=2), Clock())
    assert limiter.admit_handshake("a") is None
    assert limiter.admit_handshake("a") is None
    assert "2 TLS handshakes" in (limiter.admit_handshake("a") or "")
    assert limiter.admit_handshake("b") is None
    # Handshakes and connections are counted apart: a finished one becomes a connection.
    assert limiter.admit_connection("a") is None
    limiter.release_handshake("a")
    assert limiter.admit_handshake("a") is None
    assert limiter.refused == {"handshakes": 1}
