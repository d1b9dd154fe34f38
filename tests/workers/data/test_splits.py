"""Split assignment and epoch order: exactly once, deterministic, sharded (pure, Hypothesis)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidArgument
from workers.data.splits import (
    DEFAULT_VALIDATION_FRACTION,
    EpochRequest,
    SplitKind,
    SplitSpec,
    partition,
    plan_epoch,
    windows,
)

sizes = st.integers(min_value=0, max_value=300)
seeds = st.integers(min_value=0, max_value=2**64 - 1)
fractions = st.tuples(
    st.floats(min_value=0.0, max_value=0.45), st.floats(min_value=0.0, max_value=0.45)
)
kinds = st.sampled_from(list(SplitKind))


@st.composite
def epoch_requests(draw: st.DrawFn) -> EpochRequest:
    num_shards = draw(st.integers(min_value=1, max_value=5))
    return EpochRequest(
        split=draw(kinds),
        batch_size=draw(st.integers(min_value=1, max_value=40)),
        shuffle=draw(st.booleans()),
        seed=draw(seeds),
        epoch=draw(st.integers(min_value=0, max_value=2**64 - 1)),
        drop_last=False,
        num_shards=num_shards,
        shard_index=draw(st.integers(min_value=0, max_value=num_shards - 1)),
    )


def spec_of(fracs: tuple[float, float], seed: int) -> SplitSpec:
    return SplitSpec.of(fracs[0], fracs[1], seed)


@settings(max_examples=60, deadline=None)
@given(n=sizes, fracs=fractions, seed=seeds)
def test_partition_is_disjoint_covering_and_deterministic(
    n: int, fracs: tuple[float, float], seed: int
) -> None:
    spec = spec_of(fracs, seed)
    parts = partition(n, spec)
    together = np.concatenate([parts.train, parts.validation, parts.test])
    assert sorted(together.tolist()) == list(range(n))
    again = partition(n, spec)
    for a, b in zip(
        (parts.train, parts.validation, parts.test),
        (again.train, again.validation, again.test),
        strict=True,
    ):
        assert np.array_equal(a, b)
    if n > 0:
        assert len(parts.train) >= 1


@settings(max_examples=60, deadline=None)
@given(n=sizes, fracs=fractions, split_seed=seeds, request=epoch_requests())
def test_each_example_of_the_split_arrives_exactly_once_over_all_shards(
    n: int, fracs: tuple[float, float], split_seed: int, request: EpochRequest
) -> None:
    spec = spec_of(fracs, split_seed)
    expected = partition(n, spec).get(request.split, n)
    seen: list[int] = []
    sizes_per_shard = []
    for shard in range(request.num_shards):
        plan = plan_epoch(n, spec, _with(request, shard_index=shard))
        assert all(1 <= len(batch) <= request.batch_size for batch in plan)
        assert all(len(batch) == request.batch_size for batch in plan[:-1])
        ids = [int(i) for batch in plan for i in batch]
        sizes_per_shard.append(len(ids))
        seen += ids
    assert sorted(seen) == sorted(expected.tolist())
    assert max(sizes_per_shard) - min(sizes_per_shard) <= 1


@settings(max_examples=40, deadline=None)
@given(n=sizes, split_seed=seeds, request=epoch_requests())
def test_same_seed_and_epoch_give_the_same_order(
    n: int, split_seed: int, request: EpochRequest
) -> None:
    spec = SplitSpec.of(0.2, 0.1, split_seed)
    first = plan_epoch(n, spec, request)
    second = plan_epoch(n, spec, request)
    assert [b.tolist() for b in first] == [b.tolist() for b in second]


def test_shuffle_changes_with_the_epoch_and_the_seed() -> None:
    spec = SplitSpec.of(0.0, 0.0, 0)
    base = EpochRequest(SplitKind.ALL, batch_size=1000, shuffle=True, seed=7, epoch=0)

    def order(request: EpochRequest) -> list[int]:
        return [int(i) for i in plan_epoch(1000, spec, request)[0]]

    assert order(base) != order(_with(base, epoch=1))
    assert order(base) != order(_with(base, seed=8))
    assert sorted(order(base)) == sorted(order(_with(base, epoch=1)))
    unshuffled = plan_epoch(1000, spec, _with(base, shuffle=False))[0].tolist()
    assert unshuffled == list(range(1000))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=0, max_value=200), batch=st.integers(min_value=1, max_value=30))
def test_drop_last_keeps_only_full_batches(n: int, batch: int) -> None:
    spec = SplitSpec.of(0.0, 0.0, 0)
    plan = plan_epoch(n, spec, EpochRequest(SplitKind.ALL, batch_size=batch, drop_last=True))
    assert all(len(b) == batch for b in plan)
    assert len(plan) == n // batch


def test_split_sizes_follow_the_fractions() -> None:
    parts = partition(1000, SplitSpec.of(0.15, 0.05, 3))
    assert (len(parts.train), len(parts.validation), len(parts.test)) == (800, 150, 50)
    default = partition(10, SplitSpec.of(0.0, 0.0, 0))
    assert len(default.validation) == round(10 * DEFAULT_VALIDATION_FRACTION)


@pytest.mark.parametrize(
    ("validation", "test", "message"),
    [(1.0, 0.0, "validation_fraction"), (0.0, -0.1, "test_fraction"), (0.6, 0.5, "< 1")],
)
def test_bad_split_specs_are_rejected(validation: float, test: float, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        SplitSpec.of(validation, test, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"batch_size": -3}, "batch_size must be positive"),
        ({"batch_size": 1, "num_shards": 2, "shard_index": 2}, r"shard_index must be in \[0, 2\)"),
        ({"batch_size": 1, "num_shards": 0}, "num_shards must be >= 1"),
    ],
)
def test_bad_epoch_requests_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        EpochRequest(SplitKind.TRAIN, **kwargs)  # type: ignore[arg-type]


def _with(request: EpochRequest, **changes: object) -> EpochRequest:
    return replace(request, **changes)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=200),
    batch=st.integers(min_value=1, max_value=30),
    limit=st.integers(min_value=1, max_value=100),
)
def test_windows_keep_batch_order_and_bound_their_size(n: int, batch: int, limit: int) -> None:
    spec = SplitSpec.of(0.0, 0.0, 0)
    plan = plan_epoch(n, spec, EpochRequest(SplitKind.ALL, batch_size=batch, shuffle=True))
    groups = windows(plan, limit)
    assert [b.tolist() for g in groups for b in g] == [b.tolist() for b in plan]
    for group in groups:
        assert len(group) == 1 or sum(len(b) for b in group) <= limit
