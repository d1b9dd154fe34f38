"""When a hung worker is given up on: Kubernetes' livenessProbe, as a pure decision.

The sidecar's health probe (``mesh.sidecar.health``) already takes a worker that misses its
``Check`` deadlines out of routing (a readiness probe): a hang may pass. One that lasts the
liveness window will not be waited out: its unit (``meshserve run``) kills the worker, and the
supervisor restarts the unit as it restarts any crash (backoff and intensity limit included),
as the kubelet restarts a container after ``failureThreshold`` failed liveness probes.

Pure: the probe's results come in with their times (monotonic seconds), so the rule is
table-tested without sockets or sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Kubernetes' livenessProbe defaults, periodSeconds 10 x failureThreshold 3.
DEFAULT_WINDOW_S = 30.0
#: Missed probes in a row a verdict needs however short the window; also the number that
#: makes the worker NOT_SERVING (``health.PROBE_FAILURES`` is this), so a worker is always
#: taken out of routing before it is killed, and one slow answer never kills it.
MIN_FAILURES = 2
#: The exit status of a unit that killed its hung worker (``timeout(1)``'s "timed out"), so
#: that the supervisor can say why it restarts the unit rather than report a bare SIGKILL.
HUNG_EXIT_STATUS = 124


@dataclass(frozen=True)
class Hung:
    """The worker has answered no probe for ``silent_s`` seconds (``missed`` in a row)."""

    silent_s: float
    missed: int


class Liveness:
    """Follows probe results; says when the worker has been silent for the whole window.

    Silence is counted from the moment the first probe of the current run of misses was sent:
    the worker had answered the one before, and nothing since. An answer (any answer, an
    error status included: only a missed deadline is silence) starts over.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, min_failures: int = MIN_FAILURES):
        if window_s <= 0 or min_failures < 1:
            raise ValueError(
                f"the liveness window must be > 0 s and min_failures >= 1, got "
                f"{window_s}, {min_failures}"
            )
        self.window_s = window_s
        self.min_failures = min_failures
        self._silent_since: float | None = None
        self._missed = 0

    def probed(self, sent_at: float, answered: bool, now: float) -> Hung | None:
        """One probe's result (sent at ``sent_at``, settled at ``now``); a verdict or None."""
        if answered:
            self._silent_since = None
            self._missed = 0
            return None
        if self._silent_since is None:
            self._silent_since = sent_at
        self._missed += 1
        silent = now - self._silent_since
        if silent >= self.window_s and self._missed >= self.min_failures:
            return Hung(silent, self._missed)
        return None


def window_from_text(text: str) -> float:
    """A ``--liveness-window`` value (seconds; 0 turns liveness off), checked."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"the liveness window is a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"the liveness window must be >= 0 seconds (0: off), got {text!r}")
    return value
