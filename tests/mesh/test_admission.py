"""The admission check, table-tested: candidate config, running config, registered instances."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.balance.endpoints import EndpointsSnapshot
from mesh.config.fields import ConfigError
from mesh.config.loader import parse_yaml
from mesh.config.snapshot import MeshConfig, config_from_path
from mesh.routing.admission import admission_problems, check_admission
from mesh.routing.discovery import StaticInstance
from tests.support.istio_yaml import version_subsets

REPO = Path(__file__).resolve().parents[2]
RUNNING = config_from_path(REPO / "config")

SUBSETS = version_subsets("v1", "v9")


def vs(*destinations: str, host: str = "inference", mirror: str = "") -> str:
    """A VirtualService for ``host`` with one rule over ``destinations`` ("host[/subset]")."""
    weight = 100 // len(destinations)
    weights = [weight] * len(destinations)
    weights[0] += 100 - sum(weights)
    routes = "".join(
        f"        - destination: {{host: {d.split('/')[0]}"
        + (f", subset: {d.split('/')[1]}" if "/" in d else "")
        + "}"
        + (f"\n          weight: {w}" if len(destinations) > 1 else "")
        + "\n"
        for d, w in zip(destinations, weights, strict=True)
    )
    mirror_line = f"      mirror: {{host: {mirror}}}\n" if mirror else ""
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {host}}}\n"
        f"spec:\n  hosts: [{host}]\n  http:\n    - route:\n{routes}{mirror_line}"
    )


def candidate(*texts: str) -> MeshConfig:
    docs = [d for text in texts for d in parse_yaml("\n---\n".join([text]), "admin")]
    return RUNNING.merged(docs, version=RUNNING.version + 1, source="admin")


def registered(*specs: str) -> EndpointsSnapshot:
    """Instances as "service[:label=value]"."""
    instances = []
    for i, spec in enumerate(specs):
        service, _, label = spec.partition(":")
        labels = dict([label.split("=")]) if label else {}
        instances.append(StaticInstance(service, f"{service}-{i}", f"10.0.0.{i}:8001", labels))
    return EndpointsSnapshot.from_instances(instances)


MESH = registered("inference:version=v1", "inference:version=v1", "data", "mnist")


@pytest.mark.parametrize(
    ("texts", "endpoints", "problems"),
    [
        # Registered, built-in and DestinationRule-declared hosts are all known.
        ((vs("inference"),), MESH, []),
        ((vs("mnist", host="inference"), vs("inference", host="mnist")), MESH, []),
        ((SUBSETS, vs("inference/v1")), MESH, []),
        ((vs("training", host="data", mirror="inference"),), MESH, ["host 'data' is served now"]),
        # An unknown destination host, or mirror, is refused by its field.
        (
            (vs("nosuchservice"),),
            MESH,
            [
                "VirtualService meshserve/inference: spec.http[0].route[0].destination.host: "
                "'nosuchservice' is not a registered service",
                "host 'inference' is served now",
            ],
        ),
        (
            (vs("inference", mirror="shadow"),),
            MESH,
            ["spec.http[0].mirror.host: 'shadow' is not a registered service"],
        ),
        # A DestinationRule declares a host that has no instances yet (not served: allowed).
        (
            (
                SUBSETS.replace("host: inference", "host: shadow").replace(
                    "name: inference", "name: shadow"
                ),
                vs("inference", mirror="shadow"),
            ),
            MESH,
            [],
        ),
        # Every destination of a served host's rule is empty: the host would go dark.
        (
            (SUBSETS, vs("inference/v9")),
            MESH,
            [
                "spec.http[0].route: host 'inference' is served now (2 registered instances) "
                "but no destination of http[0] reaches one (inference/v9: no instance of "
                "'inference' has labels version=v9)"
            ],
        ),
        # One live destination is enough (a canary whose subset has no instance yet).
        ((SUBSETS, vs("inference/v1", "inference/v9")), MESH, []),
        # A host with no instances is not served: routing it to an empty subset is allowed.
        ((SUBSETS, vs("inference/v9")), registered("data"), []),
        # Before discovery reports, undeclared hosts cannot be judged and pass.
        ((vs("nosuchservice"),), None, []),
    ],
)
def test_admission_table(
    texts: tuple[str, ...], endpoints: EndpointsSnapshot | None, problems: list[str]
) -> None:
    found = admission_problems(candidate(*texts), RUNNING, endpoints)
    assert len(found) == len(problems), found
    for text, problem in zip(found, problems, strict=True):
        assert problem in text


def test_a_host_not_routable_now_is_not_blamed_on_the_change() -> None:
    broken = candidate(SUBSETS, vs("inference/v9"))
    assert admission_problems(broken, RUNNING, MESH)
    # The running config already leaves inference dark: a further change is no worse.
    assert admission_problems(broken, broken, MESH) == []


def test_check_admission_raises_a_config_error_naming_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        check_admission(candidate(vs("nosuchservice")), RUNNING, MESH)
    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert "'nosuchservice' is not a registered service" in caught.value.message
    assert "host 'inference' is served now" in caught.value.message


def test_an_unknown_subset_is_refused_by_the_build_itself() -> None:
    with pytest.raises(ConfigError, match=r"spec.http\[0\].route\[0\].destination.subset"):
        candidate(SUBSETS, vs("inference/v7"))
