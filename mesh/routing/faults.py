"""Per-call fault injection and mirroring decisions: pure, drawn from an injected random
source (the proxy passes the gateway state's, tests a seeded one)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from mesh.config.virtual_service import Destination, Fault
from mesh.routing.decision import RouteDecision
from mesh.routing.weights import percent_hit


@dataclass(frozen=True)
class FaultAction:
    """What a rule's ``fault`` does to one call: hold it ``delay`` seconds before it is
    forwarded, then (or at once) answer it with ``abort`` instead of forwarding it."""

    delay: float | None = None
    abort: grpc.StatusCode | None = None

    def __bool__(self) -> bool:
        return self.delay is not None or self.abort is not None


NO_FAULT = FaultAction()


def fault_action(fault: Fault | None, rng: random.Random) -> FaultAction:
    """Draws the delay, then the abort, each hitting its ``percentage`` of calls (as
    Istio applies them: a delayed call may also be aborted, after its delay)."""
    if fault is None:
        return NO_FAULT
    delay = None
    if fault.delay is not None and percent_hit(fault.delay.percentage, rng):
        delay = fault.delay.fixed_delay
    abort = None
    if fault.abort is not None and percent_hit(fault.abort.percentage, rng):
        abort = fault.abort.status
    return FaultAction(delay, abort) if delay is not None or abort is not None else NO_FAULT


def mirror_target(decision: RouteDecision, rng: random.Random) -> Destination | None:
    """Where this call is copied to, if its rule mirrors it (``mirrorPercentage``)."""
    mirror = decision.mirror
    if mirror is None or not percent_hit(decision.mirror_percentage, rng):
        return None
    return mirror
