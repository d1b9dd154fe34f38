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


DEMO = "model exact 'demo' and "
UNPINNED = " and without header x-model-version present"
INFER = "uri prefix '/inference.GRPCInferenceService/ModelInfer'"
STREAM = "uri exact '/inference.GRPCInferenceService/ModelStreamInfer'"


def test_changes_read_as_added_removed_and_changed_lines() -> None:
    diff = routing_diff(RUNNING, applied(CANARY))
    kinds = [(c.kind, c.subject) for c in diff.changes]
    assert kinds == [
        ("changed", "inference http[0] (infer → canary)"),
        ("changed", "inference http[1] (control → canary-stream)"),
        ("added", "inference http[2] (infer)"),
        ("added", "inference http[3] (control)"),
    ]
    canary = diff.changes[0]
    assert canary.before == f"{INFER} → inference 100%"
    # The canary keeps the infer rule's timeout and retries: no policy change is said.
    assert canary.after == f"{DEMO}{INFER}{UNPINNED} → inference 90%, inference 10%"
    assert diff.changes[1].after == f"{DEMO}{STREAM}{UNPINNED} → inference 90%, inference 10%"
    lines = diff_lines(diff)
    assert lines[0] == f"~ inference http[0] (infer → canary): {INFER} → inference 100%"
    assert lines[1].strip() == f"→ {canary.after}"
    assert lines[4] == "+ inference http[2] (infer): " + f"{INFER} → inference 100%"


def test_a_policy_change_is_said_not_spelled_out() -> None:
    without_timeout = applied(CANARY.replace("      timeout: 60s\n", "", 1))
    change = routing_diff(applied(CANARY), without_timeout).changes[0]
    assert change.subject == "inference http[0] (canary)"
    assert change.after.endswith("; and its timeout, retries, fault or header edits changed")


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
    assert [c.kind for c in diff.changes[1:]] == ["added"] * 4  # its four rules


def test_a_destination_header_edit_alone_is_still_reported() -> None:
    canary = applied(CANARY)
    edited = applied(CANARY.replace('x-model-version: "2"', 'x-model-version: "3"'))
    changes = routing_diff(canary, edited).changes
    assert [c.subject for c in changes] == [
        "inference http[0] (canary)",
        "inference http[1] (canary-stream)",
    ]
    assert all(c.after.endswith("its destinations' header edits changed") for c in changes)


def test_a_renamed_rule_is_said_by_its_subject_alone() -> None:
    renamed = applied(CANARY.replace("- name: canary-stream", "- name: stream", 1))
    changes = routing_diff(applied(CANARY), renamed).changes
    assert [c.subject for c in changes] == ["inference http[1] (canary-stream → stream)"]
    assert changes[0].after == changes[0].before  # no edit claimed that was not made


def test_binding_changes_show_gateways_and_gateway_resources() -> None:
    shipped = (REPO / "config" / "inference.yaml").read_text().split("---\n", 1)[0]
    mesh_only = shipped.replace("    - meshserve-gateway\n", "")
    edge = (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge}\n"
        "spec:\n  servers: [{port: {number: 9090, protocol: GRPC}, hosts: ['*']}]\n"
    )
    diff = routing_diff(RUNNING, applied(mesh_only + "---\n" + edge))
    assert diff.changes == (
        RouteChange("added", "Gateway meshserve/edge", "", "port 9090 hosts */*"),
        RouteChange(
            "changed", "host inference gateways", "meshserve/meshserve-gateway, mesh", "mesh"
        ),
    )
