"""When to restart a unit that exited: exponential backoff and a restart-intensity limit.

Pure: every method takes the time (``now``, monotonic seconds), so the policy is table-tested
without processes or sleeps. The models are systemd's ``RestartSec``/``StartLimitBurst`` and
Erlang/OTP's ``MaxR``/``MaxT``: a unit restarted more than ``max_restarts`` times within
``window_s`` seconds is marked failed (the rest of the mesh keeps serving); the delay before
each restart doubles from ``initial_backoff_s`` up to ``max_backoff_s`` and starts over once the
unit has run ``stable_after_s`` seconds, so an old crash does not slow down a new one.

An exit the unit was asked for (SIGTERM from ``meshserve restart`` or an operator: it drained
and stopped cleanly) is restarted at once and does not count against the intensity limit: a
rolling restart is routine, not a failure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """The knobs, validated once."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    #: A unit that has run this long is stable: its backoff starts over.
    stable_after_s: float = 30.0
    #: MaxR: restarts allowed within ``window_s`` (MaxT) before the unit is failed.
    max_restarts: int = 5
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.max_restarts < 0 or self.window_s <= 0 or self.stable_after_s < 0:
            raise ValueError("max_restarts must be >= 0; window_s > 0; stable_after_s >= 0")


@dataclass(frozen=True)
class Restart:
    """Restart the unit at ``at`` (monotonic seconds)."""

    at: float
    delay_s: float


@dataclass(frozen=True)
class GiveUp:
    """Too many restarts in the window: the unit is failed."""

    reason: str


Decision = Restart | GiveUp


@dataclass
class RestartTracker:
    """One unit's restart history under a policy."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    #: When the current run started (None: not running).
    started_at: float | None = None
    #: Times of the failure restarts inside the window (oldest first).
    recent: deque[float] = field(default_factory=deque)
    #: How many times the unit was restarted in all (clean and failed).
    restarts: int = 0
    _next_delay: float = 0.0

    def __post_init__(self) -> None:
        self._next_delay = self.policy.initial_backoff_s

    def started(self, now: float) -> None:
        self.started_at = now

    def exited(self, now: float, *, requested: bool) -> Decision:
        """The unit's process ended; what next. ``requested``: it stopped cleanly when asked."""
        policy = self.policy
        ran = now - self.started_at if self.started_at is not None else 0.0
        self.started_at = None
        if ran >= policy.stable_after_s:
            self._next_delay = policy.initial_backoff_s
        if requested:
            self.restarts += 1
            return Restart(at=now, delay_s=0.0)
        while self.recent and self.recent[0] <= now - policy.window_s:
            self.recent.popleft()
        if len(self.recent) >= policy.max_restarts:
            return GiveUp(
                f"{len(self.recent)} restarts within {policy.window_s:.0f} s "
                f"(limit {policy.max_restarts})"
            )
        delay = self._next_delay
        self._next_delay = min(delay * 2, policy.max_backoff_s)
        self.recent.append(now)
        self.restarts += 1
        return Restart(at=now + delay, delay_s=delay)
