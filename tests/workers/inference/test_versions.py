"""Version policy and version choice: table tests of the pure rules."""

from __future__ import annotations

import pytest

from mesh.errors import InvalidArgument, NotFound
from protos.inference import model_config_pb2 as mc
from workers.inference.versions import allowed_versions, choose_version


def latest(n: int) -> mc.ModelVersionPolicy:
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=n))


@pytest.mark.parametrize(
    ("policy", "on_disk", "expected"),
    [
        (mc.ModelVersionPolicy(), [3, 1, 2], [3]),  # unset: Triton's default, latest 1
        (latest(2), [1, 2, 3], [2, 3]),
        (latest(5), [1, 2], [1, 2]),
        (latest(1), [], []),
        (mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()), [2, 1], [1, 2]),
        (
            mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[1, 4])),
            [1, 2, 3],
            [1],
        ),
    ],
)
def test_allowed_versions(
    policy: mc.ModelVersionPolicy, on_disk: list[int], expected: list[int]
) -> None:
    assert allowed_versions(policy, on_disk) == expected


@pytest.mark.parametrize(
    ("requested", "header", "servable", "ready", "expected"),
    [
        ("", None, {1, 2, 3}, {1, 2, 3}, 3),  # highest ready
        ("", None, {1, 2, 3}, {1, 2}, 2),  # 3 still loading: the highest *ready* one
        ("", None, {2, 3}, set(), 3),  # none ready yet: the highest, caller waits
        ("1", None, {1, 2}, {1, 2}, 1),  # explicit
        ("2", None, {1, 2}, {1}, 2),  # explicit, still loading: caller waits
        ("", "1", {1, 2}, {1, 2}, 1),  # header decides when the request names none
        ("2", "1", {1, 2}, {1, 2}, 2),  # the request's own version beats the header
    ],
)
def test_choose_version(
    requested: str, header: str | None, servable: set[int], ready: set[int], expected: int
) -> None:
    assert choose_version("m", requested, header, servable, ready) == expected


@pytest.mark.parametrize(
    ("requested", "header", "servable", "error", "message"),
    [
        ("7", None, {1, 2}, NotFound, r"model 'm' has no version 7 \(serving: 1, 2\)"),
        ("", "9", {1}, NotFound, r"model 'm' has no version 9"),
        ("", None, set(), NotFound, r"model 'm' has no servable version"),
        ("latest", None, {1}, InvalidArgument, r"version 'latest' is not a positive integer"),
        ("0", None, {1}, InvalidArgument, r"version '0' is not a positive integer"),
    ],
)
def test_choose_version_errors(
    requested: str,
    header: str | None,
    servable: set[int],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        choose_version("m", requested, header, servable, servable)
