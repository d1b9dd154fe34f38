"""Pure tests: the membership diff and the in-memory registry used by other packages' tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from registry.instances import Instance, Load, Status, with_lease
from registry.watch import (
    Discovery,
    ElasticWatcher,
    InMemoryRegistry,
    Update,
    UpdateKind,
    apply,
    diff,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def inst(i: str, status: Status = Status.SERVING, in_flight: int = 0) -> Instance:
    return Instance("svc", i, f"h{i}:1", status=status, load=Load(in_flight=in_flight))


def test_diff_reports_add_remove_change_in_order() -> None:
    old = {"a": inst("a"), "b": inst("b"), "c": inst("c")}
    new = {"b": inst("b", Status.DRAINING), "c": inst("c"), "d": inst("d")}
    assert diff(old, new) == [
        Update(UpdateKind.REMOVE, (inst("a"),)),
        Update(UpdateKind.CHANGE, (inst("b", Status.DRAINING),)),
        Update(UpdateKind.ADD, (inst("d"),)),
    ]


def test_a_heartbeat_alone_is_not_a_change() -> None:
    before = with_lease(inst("a"), T0, timedelta(seconds=5))
    after = with_lease(before, T0 + timedelta(seconds=1), timedelta(seconds=5))
    assert diff({"a": before}, {"a": after}) == []


members = st.dictionaries(
    st.sampled_from("abcdefgh"),
    st.tuples(st.sampled_from(list(Status)), st.integers(0, 3)),
    max_size=8,
)


@given(members, members)
def test_applying_the_diff_reproduces_the_new_set(
    old_spec: dict[str, tuple[Status, int]], new_spec: dict[str, tuple[Status, int]]
) -> None:
    old = {k: inst(k, *v) for k, v in old_spec.items()}
    new = {k: inst(k, *v) for k, v in new_spec.items()}
    current = old
    for update in diff(old, new):
        current = apply(current, update)
    assert current == new
    assert diff(new, new) == []


async def test_in_memory_registry_streams_reset_then_changes() -> None:
    now = [T0]
    registry = InMemoryRegistry(clock=lambda: now[0])
    registry.put(inst("a"))
    stream = registry.updates()
    first = await anext(stream)
    assert first.kind is UpdateKind.RESET and [i.instance_id for i in first.instances] == ["a"]
    registry.put(with_lease(inst("b"), T0, timedelta(seconds=5)))
    registry.put(inst("a", Status.DRAINING))
    now[0] = T0 + timedelta(seconds=6)
    registry.expire()
    registry.remove("a")
    got = [await anext(stream) for _ in range(4)]
    assert [(u.kind, u.instance.instance_id) for u in got] == [
        (UpdateKind.ADD, "b"),
        (UpdateKind.CHANGE, "a"),
        (UpdateKind.REMOVE, "b"),
        (UpdateKind.REMOVE, "a"),
    ]
    assert registry.snapshot() == {} and registry.staleness() == 0.0
    await stream.aclose()


def test_both_implementations_satisfy_the_discovery_interface() -> None:
    # Checked by mypy: assigning a class that lacks a method fails type checking.
    implementations: list[type[Discovery]] = [InMemoryRegistry, ElasticWatcher]
    for cls in implementations:
        assert callable(cls.updates) and callable(cls.snapshot) and callable(cls.staleness)
