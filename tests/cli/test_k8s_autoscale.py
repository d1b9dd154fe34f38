"""``meshserve autoscale``'s plan: which API calls a decision makes (pure; no cluster)."""

from __future__ import annotations

from cli.autoscale import CHOSEN_COST, Pod, ScalePlan, plan
from mesh.scaling.autoscaler import Decision

PODS = [
    Pod("inference-a", "10.0.0.1", ready=True, created=1.0),
    Pod("inference-b", "10.0.0.2", ready=True, created=2.0),
    Pod("inference-c", "10.0.0.3", ready=True, created=3.0),
]
LOADS = {"10.0.0.1": 5, "10.0.0.2": 0, "10.0.0.3": 2}


def decision(desired: int) -> Decision:
    return Decision(desired, desired, panic=False, stable_load=0.0, panic_load=0.0)


def test_scale_up_patches_the_scale_only() -> None:
    assert plan(decision(5), 3, PODS, LOADS) == ScalePlan(5)


def test_no_change_makes_no_call() -> None:
    assert plan(decision(3), 3, PODS, LOADS) == ScalePlan(None)


def test_scale_down_marks_the_least_loaded_pods_for_deletion_first() -> None:
    assert plan(decision(2), 3, PODS, LOADS) == ScalePlan(2, {"inference-b": CHOSEN_COST})
    assert plan(decision(1), 3, PODS, LOADS) == ScalePlan(
        1, {"inference-b": CHOSEN_COST, "inference-c": CHOSEN_COST}
    )


def test_a_pod_missing_from_the_registry_counts_as_idle() -> None:
    assert plan(decision(2), 3, PODS, {"10.0.0.2": 4, "10.0.0.3": 1}).deletion_costs == {
        "inference-a": CHOSEN_COST
    }


def test_no_scale_down_while_a_pod_is_not_ready() -> None:
    joining = [*PODS, Pod("inference-d", "10.0.0.4", ready=False, created=4.0)]
    assert plan(decision(2), 4, joining, LOADS) == ScalePlan(None)
