"""The config pipeline, table-tested without sockets: the pure merge, the overlay, and what
a store version does to the running state (installed, or refused with the time recorded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.balance.endpoints import EndpointsSnapshot
from mesh.config.fields import ConfigError
from mesh.config.loader import load_path, parse_yaml
from mesh.config.snapshot import EMPTY
from mesh.routing.discovery import StaticInstance
from mesh.routing.pipeline import ConfigPipeline, describe, merge, overlaid
from mesh.routing.state import GatewayState
from tests.support.istio_yaml import routed_to, version_subsets

REPO = Path(__file__).resolve().parents[2]
BASE = load_path(REPO / "config")

SUBSETS = version_subsets("v1", "v2")


def registered(*versions: str) -> EndpointsSnapshot:
    return EndpointsSnapshot.from_instances(
        [
            StaticInstance("inference", f"i{n}", f"10.0.0.{n}:1", {"version": v})
            for n, v in enumerate(versions)
        ],
        1,
    )


@dataclass(frozen=True)
class Stored:
    name: str
    version: int
    yaml: str


@pytest.mark.parametrize(
    ("overlay", "endpoints", "problem"),
    [
        # The directory alone, nothing known yet: valid.
        ("", None, None),
        # A subset the overlay's DestinationRule defines, an instance in it.
        (routed_to("inference/v2") + "---\n" + SUBSETS, registered("v1", "v2"), None),
        # Not yet discovered: registrations are unknown, so only the config itself counts.
        (routed_to("inference/v2") + "---\n" + SUBSETS, None, None),
        # A subset nothing defines: inconsistent in itself.
        (routed_to("inference/nowhere"), None, "nowhere"),
        # A served host left without a reachable route (admission).
        (routed_to("inference/v2") + "---\n" + SUBSETS, registered("v1"), "inference"),
    ],
)
def test_merge(overlay: str, endpoints: EndpointsSnapshot | None, problem: str | None) -> None:
    running = EMPTY.merged(BASE, version=3, source="dir")
    docs = parse_yaml(overlay, "admin") if overlay else []
    if problem is None:
        config = merge(BASE, docs, source="dir + admin", running=running, endpoints=endpoints)
        assert (config.version, config.source) == (4, "dir + admin")
    else:
        with pytest.raises(ConfigError) as refused:
            merge(BASE, docs, source="dir + admin", running=running, endpoints=endpoints)
        assert problem in refused.value.message


def test_an_overlay_replaces_resources_of_the_same_kind_namespace_and_name() -> None:
    first = parse_yaml(routed_to("inference/v1") + "---\n" + SUBSETS, "a")
    second = parse_yaml(routed_to("inference/v2"), "b")
    merged = overlaid(first, second)
    assert [(d.kind, d.resource.metadata.name) for d in merged] == [
        ("DestinationRule", "inference"),
        ("VirtualService", "inference"),
    ]
    assert merged[-1] is second[0]


@pytest.mark.parametrize(
    ("config_dir", "stored", "admin", "source"),
    [
        (None, None, False, "<none>"),
        (Path("/etc/mesh"), None, False, "/etc/mesh"),
        (Path("/etc/mesh"), None, True, "/etc/mesh + admin"),
        (Path("/etc/mesh"), Stored("routing", 7, ""), True, "/etc/mesh + store 'routing' v7"),
        (None, Stored("routing", 2, ""), False, "store 'routing' v2"),
    ],
)
def test_describe(config_dir: Path | None, stored: Stored | None, admin: bool, source: str) -> None:
    assert describe(config_dir, stored, admin) == source


@pytest.mark.parametrize(
    ("versions", "installed", "rejected"),
    [
        # Each good version replaces the overlay.
        (
            [
                routed_to("inference/v1") + "---\n" + SUBSETS,
                routed_to("inference/v2") + "---\n" + SUBSETS,
            ],
            2,
            None,
        ),
        # A bad one after a good one: refused, the good one keeps running.
        ([routed_to("inference/v1") + "---\n" + SUBSETS, routed_to("inference/nowhere")], 1, 2),
        # Unparseable YAML is refused the same way.
        ([routed_to("inference/v1") + "---\n" + SUBSETS, "kind: [unclosed"], 1, 2),
        # A bad first version: the directory alone keeps routing.
        ([routed_to("inference/nowhere")], 0, 1),
    ],
)
def test_store_versions_install_or_are_refused(
    versions: list[str], installed: int, rejected: int | None
) -> None:
    now = [1000.0]
    state = GatewayState(clock=lambda: 0.0, wall_clock=lambda: now[0])
    pipeline = ConfigPipeline(state, config_dir=REPO / "config")
    pipeline.load_directory()
    pipeline.discovered = True
    state.set_endpoints(registered("v1", "v2"))
    base_version = state.config.version
    for n, text in enumerate(versions, start=1):
        now[0] = 1000.0 + n
        took = pipeline.take_store_version(Stored("routing", n, text))
        assert took == (n != rejected)
    assert pipeline.store_version == installed
    assert state.config.version == base_version + installed
    if rejected is None:
        assert state.last_rejection is None
    else:
        assert state.last_rejection is not None
        assert state.last_rejection.source == f"store 'routing' v{rejected}"
        assert state.last_rejection.at == 1000.0 + rejected
