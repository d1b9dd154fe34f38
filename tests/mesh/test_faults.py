"""Fault and mirror decisions, and response header edits on an HTTP/2 header block."""

from __future__ import annotations

import random

import grpc
import pytest

from mesh.config.virtual_service import (
    Destination,
    Fault,
    FaultAbort,
    FaultDelay,
    HeaderOperations,
)
from mesh.routing import headers as md
from mesh.routing.decision import DEFAULT_RETRIES, RouteDecision
from mesh.routing.faults import NO_FAULT, FaultAction, fault_action, mirror_target

DELAY = FaultDelay(fixed_delay=0.5, percentage=100.0)
ABORT = FaultAbort(status=grpc.StatusCode.UNAVAILABLE, percentage=100.0)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (None, NO_FAULT),
        (Fault(), NO_FAULT),
        (Fault(delay=DELAY), FaultAction(delay=0.5)),
        (Fault(abort=ABORT), FaultAction(abort=grpc.StatusCode.UNAVAILABLE)),
        (Fault(delay=DELAY, abort=ABORT), FaultAction(0.5, grpc.StatusCode.UNAVAILABLE)),
        (Fault(delay=FaultDelay(0.5, 0.0), abort=FaultAbort(ABORT.status, 0.0)), NO_FAULT),
    ],
)
def test_fault_action_table(fault: Fault | None, expected: FaultAction) -> None:
    assert fault_action(fault, random.Random(1)) == expected
    assert bool(expected) == (expected != NO_FAULT)


def test_fault_percentages_follow_the_seeded_source() -> None:
    fault = Fault(delay=FaultDelay(0.1, 30.0), abort=FaultAbort(grpc.StatusCode.INTERNAL, 60.0))
    # The delay is drawn first, then the abort: the same draws a replay of the source gives.
    replay = random.Random(42)
    expected = []
    for _ in range(200):
        delay = 0.1 if replay.random() * 100 < 30.0 else None
        abort = grpc.StatusCode.INTERNAL if replay.random() * 100 < 60.0 else None
        expected.append(FaultAction(delay, abort))
    rng = random.Random(42)
    actions = [fault_action(fault, rng) for _ in range(200)]
    assert actions == expected
    delayed = sum(a.delay is not None for a in actions)
    aborted = sum(a.abort is not None for a in actions)
    assert 35 <= delayed <= 85 and 90 <= aborted <= 150, (delayed, aborted)


def _decision(mirror: Destination | None, percentage: float) -> RouteDecision:
    return RouteDecision(
        host="inference",
        subset="",
        route="VirtualService/x http[0]",
        rule=None,
        metadata=(),
        response_headers=(),
        timeout=None,
        retries=DEFAULT_RETRIES,
        hash_key=None,
        candidates=(),
        mirror=mirror,
        mirror_percentage=percentage,
    )


SHADOW = Destination("inference", "shadow")


@pytest.mark.parametrize(
    ("mirror", "percentage", "hits"),
    [(None, 100.0, 0), (SHADOW, 100.0, 50), (SHADOW, 0.0, 0)],
)
def test_mirror_target_table(mirror: Destination | None, percentage: float, hits: int) -> None:
    rng = random.Random(3)
    targets = [mirror_target(_decision(mirror, percentage), rng) for _ in range(50)]
    assert sum(t is not None for t in targets) == hits
    assert all(t in (None, mirror) for t in targets)


def test_mirror_percentage_is_a_share_of_calls() -> None:
    rng = random.Random(9)
    hits = sum(mirror_target(_decision(SHADOW, 25.0), rng) is not None for _ in range(400))
    assert 65 <= hits <= 135, hits  # Binomial(400, 0.25): 4 sd either side


RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"x-worker", b"w0"),
    (b"x-drop", b"1"),
    (b"trace-bin", b"\x00\x01"),
]


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ((), RESPONSE),
        (
            (HeaderOperations(set=(("x-served-by", "mesh"),)),),
            [
                *RESPONSE[:2],
                RESPONSE[4],
                (b"x-worker", b"w0"),
                (b"x-drop", b"1"),
                (b"x-served-by", b"mesh"),
            ],
        ),
        (
            (HeaderOperations(remove=("x-drop",), add=(("x-worker", "again"),)),),
            [*RESPONSE[:2], RESPONSE[4], (b"x-worker", b"w0"), (b"x-worker", b"again")],
        ),
        # Rule, then destination: the second block sees the first's result.
        (
            (
                HeaderOperations(set=(("x-worker", "rule"),)),
                HeaderOperations(set=(("x-worker", "destination"),), remove=("x-drop",)),
            ),
            [*RESPONSE[:2], RESPONSE[4], (b"x-worker", b"destination")],
        ),
        # gRPC's own fields and pseudo-headers are never edited.
        (
            (HeaderOperations(remove=("content-type", ":status", "grpc-status")),),
            [*RESPONSE[:2], RESPONSE[4], RESPONSE[2], RESPONSE[3]],
        ),
    ],
)
def test_edit_block_table(
    ops: tuple[HeaderOperations, ...], expected: list[tuple[bytes, bytes]]
) -> None:
    assert md.edit_block(ops, RESPONSE) == expected


def test_edit_block_keeps_a_trailers_only_status() -> None:
    trailers_only = [(b":status", b"200"), (b"grpc-status", b"14"), (b"grpc-message", b"down")]
    edited = md.edit_block((HeaderOperations(set=(("x-served-by", "mesh"),)),), trailers_only)
    assert edited == [*trailers_only, (b"x-served-by", b"mesh")]
