"""The service-instance domain type, its lease arithmetic and its Elasticsearch document form."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from mesh.errors import InvalidArgument

#: The wall clock used for leases; injected everywhere so tests control time.
WallClock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Status(enum.StrEnum):
    """What the instance says about itself; only SERVING instances should get new requests."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    DRAINING = "DRAINING"


class MalformedDocument(ValueError):
    """A stored document does not decode into its domain type; readers skip it."""


@dataclass(frozen=True)
class ModelRef:
    """One model version loaded by an instance."""

    model: str
    version: str

    def __str__(self) -> str:
        return f"{self.model}:{self.version}"


@dataclass(frozen=True)
class Load:
    """Load reported with every heartbeat (inputs for least-loaded choices)."""

    in_flight: int = 0
    queue_depth: int = 0
    memory_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("in_flight", "queue_depth", "memory_bytes"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"load.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Instance:
    """One registered service instance (an endpoint, in Istio's words).

    ``registered_at``/``heartbeat_at``/``expires_at`` are filled in by the store; two
    instances that differ only in those are the same endpoint (see ``same_endpoint``).
    Not hashable (labels is a mapping): key instances by ``instance_id``.
    """

    service: str
    instance_id: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    status: Status = Status.SERVING
    models: tuple[ModelRef, ...] = ()
    load: Load = Load()
    registered_at: datetime | None = None
    heartbeat_at: datetime | None = None
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("service", "instance_id", "address"):
            if not getattr(self, name):
                raise InvalidArgument(f"instance {name} must not be empty")
        for key in self.labels:
            if not key or "=" in key:
                raise InvalidArgument(f"label key {key!r} must be non-empty and without '='")
        # Frozen means frozen: copy the caller's dict and hide it behind a read-only view.
        object.__setattr__(self, "labels", MappingProxyType(dict(sorted(self.labels.items()))))
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "models", tuple(self.models))

    def same_endpoint(self, other: Instance) -> bool:
        """Equal apart from lease timestamps (a heartbeat alone is not a change)."""
        return self.without_lease() == other.without_lease()

    def without_lease(self) -> Instance:
        return replace(self, registered_at=None, heartbeat_at=None, expires_at=None)

    def matches(self, selector: Mapping[str, str]) -> bool:
        """Whether every selector label is set to the same value (a DestinationRule subset)."""
        return all(self.labels.get(k) == v for k, v in selector.items())


# ---- lease arithmetic (pure) -------------------------------------------------------------


def to_millis(moment: datetime) -> datetime:
    """Drops sub-millisecond digits, so a value equals itself after a round trip through a
    ``date`` field."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def lease_expiry(heartbeat_at: datetime, ttl: timedelta) -> datetime:
    return heartbeat_at + ttl


def is_live(instance: Instance, now: datetime) -> bool:
    """A lease is live strictly before its expiry; an instance without a lease is not live."""
    return instance.expires_at is not None and now < instance.expires_at


def lease_age(instance: Instance, now: datetime) -> timedelta | None:
    """Time since the last heartbeat, or None before the first one."""
    return None if instance.heartbeat_at is None else now - instance.heartbeat_at


def with_lease(instance: Instance, now: datetime, ttl: timedelta) -> Instance:
    """The instance as stored after a heartbeat at ``now``."""
    now = to_millis(now)
    return replace(
        instance,
        registered_at=instance.registered_at or now,
        heartbeat_at=now,
        expires_at=lease_expiry(now, ttl),
    )


# ---- document form -----------------------------------------------------------------------


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds, the precision of an Elasticsearch ``date``."""
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; pass an aware (UTC) datetime")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(raw: object, name: str) -> datetime:
    if not isinstance(raw, str):
        raise MalformedDocument(f"{name} must be an ISO date string, got {raw!r}")
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise MalformedDocument(f"{name} {raw!r} is not an ISO date") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def to_document(instance: Instance) -> dict[str, Any]:
    """The instance as an ``<prefix>-instances`` document (lease fields must be set)."""
    if instance.heartbeat_at is None or instance.expires_at is None:
        raise ValueError("an instance document needs a lease: use with_lease() first")
    ttl = instance.expires_at - instance.heartbeat_at
    return {
        "service": instance.service,
        "instance_id": instance.instance_id,
        "address": instance.address,
        "labels": [f"{k}={v}" for k, v in instance.labels.items()],
        "label_map": dict(instance.labels),
        "status": instance.status.value,
        "models": [{"model": m.model, "version": m.version} for m in instance.models],
        "load": {
            "in_flight": instance.load.in_flight,
            "queue_depth": instance.load.queue_depth,
            "memory_bytes": instance.load.memory_bytes,
        },
        "registered_at": format_time(instance.registered_at or instance.heartbeat_at),
        "heartbeat_at": format_time(instance.heartbeat_at),
        "expires_at": format_time(instance.expires_at),
        "ttl_ms": int(ttl.total_seconds() * 1000),
    }


def _str(source: Mapping[str, Any], name: str, where: str = "") -> str:
    value = source.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedDocument(f"{where}{name} must be a non-empty string, got {value!r}")
    return value


def from_document(source: Mapping[str, Any]) -> Instance:
    """Decodes a stored document; raises ``MalformedDocument`` naming the bad field."""
    try:
        labels = source.get("label_map") or {}
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise MalformedDocument(f"label_map must map strings to strings, got {labels!r}")
        status_raw = source.get("status")
        try:
            status = Status(str(status_raw))
        except ValueError as exc:
            raise MalformedDocument(f"status {status_raw!r} is not one of {list(Status)}") from exc
        models_raw = source.get("models") or []
        if isinstance(models_raw, Mapping):  # Elasticsearch returns a lone object as is
            models_raw = [models_raw]
        models = tuple(
            ModelRef(model=_str(m, "model", "models."), version=_str(m, "version", "models."))
            for m in models_raw
        )
        load_raw = source.get("load") or {}
        load = Load(
            in_flight=int(load_raw.get("in_flight", 0)),
            queue_depth=int(load_raw.get("queue_depth", 0)),
            memory_bytes=int(load_raw.get("memory_bytes", 0)),
        )
        return Instance(
            service=_str(source, "service"),
            instance_id=_str(source, "instance_id"),
            address=_str(source, "address"),
            labels=labels,
            status=status,
            models=models,
            load=load,
            registered_at=parse_time(source.get("registered_at"), "registered_at"),
            heartbeat_at=parse_time(source.get("heartbeat_at"), "heartbeat_at"),
            expires_at=parse_time(source.get("expires_at"), "expires_at"),
        )
    except MalformedDocument:
        raise
    except (InvalidArgument, TypeError, ValueError, AttributeError) as exc:
        raise MalformedDocument(str(exc)) from exc
