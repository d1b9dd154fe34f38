"""The ``meshserve.io/autoscale-*`` annotations of a DestinationRule: how its host's replicas
follow load.

Kubernetes and Knative have no Istio field for this, so it is meshserve behaviour beyond
Istio and lives in annotations (Istio ignores them; the file stays valid for Istio). The
names and defaults follow the two autoscalers the policy copies: Knative's KPA for the
windows and panic mode (``autoscaling.knative.dev/window``, ``panic-window-percentage``,
``panic-threshold-percentage``), the HorizontalPodAutoscaler for the stabilisation windows
(``behavior.scaleUp/scaleDown.stabilizationWindowSeconds``). The replica bounds are not
here: they belong to whoever runs the replicas (``up --autoscale inference=1:4``, the HPA's
``minReplicas``/``maxReplicas``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.config.fields import Node, parse_duration

ANNOTATION_TARGET = "meshserve.io/autoscale-target"
ANNOTATION_WINDOW = "meshserve.io/autoscale-window"
ANNOTATION_PANIC_WINDOW = "meshserve.io/autoscale-panic-window"
ANNOTATION_PANIC_THRESHOLD = "meshserve.io/autoscale-panic-threshold-percentage"
ANNOTATION_SCALE_UP = "meshserve.io/autoscale-scale-up-stabilization"
ANNOTATION_SCALE_DOWN = "meshserve.io/autoscale-scale-down-stabilization"
ANNOTATIONS = (
    ANNOTATION_TARGET,
    ANNOTATION_WINDOW,
    ANNOTATION_PANIC_WINDOW,
    ANNOTATION_PANIC_THRESHOLD,
    ANNOTATION_SCALE_UP,
    ANNOTATION_SCALE_DOWN,
)

#: Requests in flight (queued ones included) per replica the policy aims at. A worker batches
#: concurrent calls, so it serves this many at once well; past it, latency grows with the queue.
DEFAULT_TARGET = 16.0
#: Knative's stable window and its panic window (10 % of it), threshold 200 %.
DEFAULT_WINDOW_S = 60.0
DEFAULT_PANIC_WINDOW_S = 6.0
DEFAULT_PANIC_THRESHOLD = 2.0
#: The HPA's defaults: scale up at once, scale down on the highest recommendation of 5 min.
DEFAULT_SCALE_UP_S = 0.0
DEFAULT_SCALE_DOWN_S = 300.0


@dataclass(frozen=True)
class AutoscaleSettings:
    """The policy's knobs for one host, validated once."""

    target: float = DEFAULT_TARGET
    window_s: float = DEFAULT_WINDOW_S
    panic_window_s: float = DEFAULT_PANIC_WINDOW_S
    #: Panic when the panic window's load asks for this many times the ready replicas.
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD
    scale_up_stabilization_s: float = DEFAULT_SCALE_UP_S
    scale_down_stabilization_s: float = DEFAULT_SCALE_DOWN_S

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"autoscale target must be > 0, got {self.target}")
        if not 0 < self.panic_window_s <= self.window_s:
            raise ValueError("need 0 < panic window <= window")
        if not self.panic_threshold > 1.0:
            raise ValueError(f"panic threshold must be > 100 %, got {self.panic_threshold:.0%}")
        if self.scale_up_stabilization_s < 0 or self.scale_down_stabilization_s < 0:
            raise ValueError("stabilization windows must be >= 0")


def parse_autoscale(node: Node, annotations: dict[str, str]) -> AutoscaleSettings:
    """Reads the autoscale annotations (``node``: the annotations, for error paths)."""

    def number(key: str, default: float, low: float, high: float) -> float:
        text = annotations.get(key)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            node.child(key).fail(
                f"must be a number in [{low:g}, {high:g}] as a string, got {text!r}"
            )
        return value

    def seconds(key: str, default: float, *, allow_zero: bool) -> float:
        text = annotations.get(key)
        if text is None:
            return default
        value = parse_duration(text)
        if value is None or value < 0 or (value == 0 and not allow_zero):
            node.child(key).fail(f'must be a duration such as "60s" or "1m30s", got {text!r}')
        return value

    window = seconds(ANNOTATION_WINDOW, DEFAULT_WINDOW_S, allow_zero=False)
    # Knative's panic window is a percentage of the stable one; an absolute duration is
    # clearer to read next to the other windows, so it is one here.
    panic_window = seconds(
        ANNOTATION_PANIC_WINDOW, min(DEFAULT_PANIC_WINDOW_S, window), allow_zero=False
    )
    if panic_window > window:
        node.child(ANNOTATION_PANIC_WINDOW).fail(
            f"must not be longer than {ANNOTATION_WINDOW} ({window:g} s), got {panic_window:g} s"
        )
    return AutoscaleSettings(
        target=number(ANNOTATION_TARGET, DEFAULT_TARGET, 0.01, 1e6),
        window_s=window,
        panic_window_s=panic_window,
        # Knative accepts 110 to 1000 per cent.
        panic_threshold=number(ANNOTATION_PANIC_THRESHOLD, DEFAULT_PANIC_THRESHOLD * 100, 110, 1000)
        / 100,
        scale_up_stabilization_s=seconds(ANNOTATION_SCALE_UP, DEFAULT_SCALE_UP_S, allow_zero=True),
        scale_down_stabilization_s=seconds(
            ANNOTATION_SCALE_DOWN, DEFAULT_SCALE_DOWN_S, allow_zero=True
        ),
    )
