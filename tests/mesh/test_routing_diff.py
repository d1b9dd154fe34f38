"""The routing diff `meshserve apply --dry-run` prints: pure, from two configs."""

from __future__ import annotations

from pathlib import Path

from mesh.config.loader import parse_yaml
from mesh.config.snapshot import MeshConfig, config_from_path
from mesh.routing.diff import RouteChange, diff_lines, routing_diff
from tests.support.istio_yaml import version_subsets

REPO = Path(__file__).resolve().parents[2]
RUNNING = config_from_path(REPO / "config")
CANARY = (REPO / "config" / "examples" / "canary-90-10.yaml").read_text()
SUBSETS = version_subsets("v1")


def applied(text: str) -> MeshConfig:
    return RUNNING.merged(parse_yaml(text, "admin"), version=2, source="admin")


def test_the_same_config_has_no_change() -> None:
    assert not routing_diff(RUNNING, RUNNING)
    assert diff_lines(routing_diff(RUNNING, RUNNING)) == ["no routing change"]


def test_changes_read_as_added_removed_and_changed_lines() -> None:
    diff = routing_diff(RUNNING, applied(CANARY))
    kinds = [(c.kind, c.subject) for c in diff.changes]
    assert kinds == [
        ("changed", "inference http[0] (infer → pinned)"),
        ("changed", "inference http[1] (control → canary)"),
    ]
    pinned = diff.changes[0]
    assert pinned.before == (
        "uri prefix '/inference.GRPCInferenceService/ModelInfer' → inference 100%"
    )
    # The infer rule's timeout and retries go with it: said, not spelled out.
    assert pinned.after == (
        "header x-model-version present → inference 100%; "
        "and its timeout, retries, fault or header edits changed"
    )
    canary = diff.changes[1]
    assert canary.before == "any request → inference 100%"
    assert canary.after == "any request → inference 90%, inference 10%"
    lines = diff_lines(diff)
    assert lines[2] == "~ inference http[1] (control → canary): any request → inference 100%"
    assert lines[3].strip() == "→ any request → inference 90%, inference 10%"


def test_subsets_and_policies_are_compared_by_host() -> None:
    with_subsets = applied(SUBSETS)
    diff = routing_diff(RUNNING, with_subsets)
    assert RouteChange("added", "subset inference/v1", "", "version=v1") in diff.changes
    # The DestinationRule replaced had a consistent-hash policy; this one has none.
    assert any(c.subject == "traffic policy of inference" for c in diff.changes)
    back = routing_diff(with_subsets, RUNNING)
    assert RouteChange("removed", "subset inference/v1", "version=v1", "") in back.changes


def test_a_new_virtual_service_replaces_the_default_route() -> None:
    text = CANARY.replace("name: inference", "name: extra").replace("- inference\n", "- extra\n", 1)
    diff = routing_diff(RUNNING, applied(text))
    assert diff.changes[0] == RouteChange(
        "added", "host extra", "default route to extra", "VirtualService/extra"
    )
    assert [c.kind for c in diff.changes[1:]] == ["added", "added"]


def test_a_destination_header_edit_alone_is_still_reported() -> None:
    canary = applied(CANARY)
    edited = applied(CANARY.replace('x-model-version: "2"', 'x-model-version: "3"'))
    (change,) = routing_diff(canary, edited).changes
    assert change.subject == "inference http[1] (canary)"
    assert change.after.endswith("its destinations' header edits changed")
