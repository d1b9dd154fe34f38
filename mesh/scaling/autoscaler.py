"""The autoscaling decision: desired replicas from observed load, Knative's panic mode and the
HPA's stabilisation windows. Pure: every call takes the time, so it is table-tested.

desired = ceil(load / target) within [min, max], where load is the service's requests in
flight (queued ones included) summed over its instances' load reports. The load is averaged
over a stable window (Knative's 60 s); a short panic window (6 s) catches bursts: when it
asks for ``panic_threshold`` times the current replicas, the scaler panics, scales on the
panic window and never scales down until a whole stable window passes without a burst
(Knative's KPA). The recommendation then passes the HPA's stabilisation: scale up to the
lowest recommendation of the scale-up window (0 s: at once), down to the highest of the
scale-down window (300 s), so a dip does not cost a replica that the next burst needs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.config.autoscale import AutoscaleSettings


@dataclass(frozen=True)
class Bounds:
    """The replica range, e.g. ``1:4`` (min 1, max 4)."""

    min: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.max or self.max < 1:
            raise ValueError(f"need 0 <= min <= max and max >= 1, got {self.min}:{self.max}")

    @classmethod
    def parse(cls, text: str) -> Bounds:
        low, sep, high = text.partition(":")
        try:
            least, most = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"replicas must read MIN:MAX (e.g. 1:4), got {text!r}") from None
        return cls(least, most)

    def clamp(self, replicas: int) -> int:
        return max(self.min, min(self.max, replicas))


@dataclass(frozen=True)
class Decision:
    """What the scaler wants now, and why (for logs and ``explain``)."""

    desired: int
    #: Before stabilisation: what the load alone asks for (within bounds).
    recommended: int
    panic: bool
    stable_load: float
    panic_load: float


class Autoscaler:
    """One service's scaler: feed it load samples, ask it for a decision."""

    def __init__(self, settings: AutoscaleSettings, bounds: Bounds) -> None:
        self.settings = settings
        self.bounds = bounds
        self._samples: deque[tuple[float, float]] = deque()
        self._recommendations: deque[tuple[float, int]] = deque()
        #: While panicking: when panic ends unless another burst extends it.
        self._panic_until: float | None = None
        #: The most replicas asked for during this panic (panic never scales down).
        self._panic_high = 0

    def observe(self, now: float, load: float) -> None:
        """One sample of the service's total load (requests in flight and queued)."""
        self._samples.append((now, max(0.0, load)))
        horizon = now - self.settings.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def _average(self, now: float, window: float) -> float:
        recent = [load for at, load in self._samples if at >= now - window]
        return sum(recent) / len(recent) if recent else 0.0

    def decide(self, now: float, current: int) -> Decision:
        """The replicas wanted now, given ``current`` replicas (started or starting)."""
        s = self.settings
        stable = self._average(now, s.window_s)
        burst = self._average(now, s.panic_window_s)
        # Knative compares the unrounded ask with the ready replicas.
        if burst / s.target >= s.panic_threshold * max(current, 1):
            self._panic_until = now + s.window_s
        elif self._panic_until is not None and now >= self._panic_until:
            self._panic_until = None
            self._panic_high = 0
        panic = self._panic_until is not None
        if panic:
            wanted = max(math.ceil(burst / s.target), current, self._panic_high)
            self._panic_high = wanted
        else:
            wanted = math.ceil(stable / s.target)
        recommended = self.bounds.clamp(wanted)
        desired = self._stabilise(now, current, recommended)
        return Decision(self.bounds.clamp(desired), recommended, panic, stable, burst)

    def _stabilise(self, now: float, current: int, recommended: int) -> int:
        """The HPA's rule: up to the lowest recommendation of the scale-up window, down to
        the highest of the scale-down window, else stay."""
        s = self.settings
        self._recommendations.append((now, recommended))
        keep = max(s.scale_up_stabilization_s, s.scale_down_stabilization_s)
        while self._recommendations and self._recommendations[0][0] < now - keep:
            self._recommendations.popleft()
        up = min(r for at, r in self._recommendations if at >= now - s.scale_up_stabilization_s)
        down = max(r for at, r in self._recommendations if at >= now - s.scale_down_stabilization_s)
        if current < up:
            return up
        if current > down:
            return down
        return current


@dataclass(frozen=True)
class Candidate:
    """A replica that scale-down may stop: its name, its load, when it started (an order)."""

    name: str
    load: int
    started: int


def least_loaded(candidates: Sequence[Candidate], count: int) -> list[str]:
    """The ``count`` replicas to stop: the least loaded first (fewest calls to drain), the
    newest on a tie (the oldest replicas hold the longest-warmed weights)."""
    ranked = sorted(candidates, key=lambda c: (c.load, -c.started, c.name))
    return [c.name for c in ranked[: max(0, count)]]
