"""Pure tests: the Instance type, lease arithmetic and the document round trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mesh.errors import InvalidArgument
from registry.instances import (
    Instance,
    Load,
    MalformedDocument,
    ModelRef,
    Status,
    format_time,
    from_document,
    is_live,
    lease_age,
    to_document,
    with_lease,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
TTL = timedelta(seconds=5)


def make(**overrides: object) -> Instance:
    fields: dict[str, object] = {
        "service": "inference",
        "instance_id": "inference-1",
        "address": "10.0.0.1:8001",
        "labels": {"version": "v2", "app.kubernetes.io/name": "resnet"},
        "models": (ModelRef("resnet", "3"),),
        "load": Load(in_flight=2, queue_depth=1, memory_bytes=1 << 30),
    }
    fields.update(overrides)
    return Instance(**fields)  # type: ignore[arg-type]


def test_lease_is_live_strictly_before_expiry() -> None:
    leased = with_lease(make(), T0, TTL)
    assert leased.expires_at == T0 + TTL
    assert is_live(leased, T0 + TTL - timedelta(milliseconds=1))
    assert not is_live(leased, T0 + TTL)
    assert not is_live(make(), T0)  # never heartbeated
    assert lease_age(leased, T0 + timedelta(seconds=2)) == timedelta(seconds=2)
    assert lease_age(make(), T0) is None


def test_heartbeat_keeps_registration_time() -> None:
    first = with_lease(make(), T0, TTL)
    second = with_lease(first, T0 + timedelta(seconds=1), TTL)
    assert second.registered_at == T0
    assert second.expires_at == T0 + timedelta(seconds=6)
    assert first.same_endpoint(second)
    assert not first.same_endpoint(with_lease(make(status=Status.DRAINING), T0, TTL))


def test_document_round_trip_keeps_every_field() -> None:
    leased = with_lease(make(), T0, TTL)
    document = to_document(leased)
    assert document["labels"] == ["app.kubernetes.io/name=resnet", "version=v2"]
    assert document["ttl_ms"] == 5000
    assert document["heartbeat_at"] == "2026-01-02T03:04:05.678Z"
    assert from_document(document) == leased


def test_labels_are_frozen_copies() -> None:
    labels = {"a": "1"}
    instance = make(labels=labels)
    labels["a"] = "2"
    assert instance.labels["a"] == "1"
    with pytest.raises(TypeError):
        instance.labels["a"] = "3"  # type: ignore[index]
    assert instance.matches({"a": "1"}) and not instance.matches({"a": "2"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"service": ""}, "service"), ({"address": ""}, "address"), ({"labels": {"a=b": "c"}}, "a=b")],
)
def test_invalid_instances_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make(**overrides)


def test_negative_load_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="in_flight"):
        Load(in_flight=-1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("status", "BOGUS", "status"),
        ("address", "", "address"),
        ("expires_at", "yesterday", "expires_at"),
        ("label_map", {"a": 1}, "label_map"),
        ("load", {"in_flight": "many"}, "many"),
    ],
)
def test_malformed_documents_name_the_field(field: str, value: object, message: str) -> None:
    document = to_document(with_lease(make(), T0, TTL))
    document[field] = value
    with pytest.raises(MalformedDocument, match=message):
        from_document(document)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2026, 1, 1))
