"""The model catalog: published versions and their stage, changed with optimistic concurrency."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from elasticsearch import AsyncElasticsearch, ConflictError, NotFoundError

from mesh.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from registry.connect import Sleep
from registry.instances import (
    MalformedDocument,
    WallClock,
    format_time,
    parse_time,
    to_millis,
    utc_now,
)
from registry.schema import Indices

log = logging.getLogger(__name__)

#: How many times a promote/rollback re-reads and retries after losing a race.
DEFAULT_ATTEMPTS = 5
#: Previous production versions remembered for rollback.
MAX_HISTORY = 100


class Stage(enum.StrEnum):
    CANDIDATE = "candidate"  # published, never served as production
    PRODUCTION = "production"  # the one version a model serves by default
    ARCHIVED = "archived"  # was production (or was retired by hand)


class _Any(enum.Enum):
    ANY = "any"


#: ``expected_production=ANY`` skips the precondition (the default).
ANY: Final = _Any.ANY


@dataclass(frozen=True)
class ModelVersion:
    """One published version, as the training worker records it."""

    model: str
    version: str
    artifact_url: str
    created_at: datetime
    metrics: Mapping[str, float] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("model", "version", "artifact_url"):
            if not getattr(self, name):
                raise InvalidArgument(f"model version {name} must not be empty")
        if "/" in self.model:
            raise InvalidArgument(f"model name {self.model!r} must not contain '/'")
        if self.created_at.tzinfo is None:
            raise InvalidArgument("created_at must be timezone-aware")
        object.__setattr__(self, "created_at", to_millis(self.created_at))
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "lineage", MappingProxyType(dict(self.lineage)))


@dataclass(frozen=True)
class Head:
    """Per-model stage record: the single document every promote/rollback compares-and-sets.

    Stages live here rather than on each version document, so moving production from one
    version to another is one atomic write, never two that a crash could split.
    """

    model: str
    production: str | None = None
    history: tuple[str, ...] = ()  # earlier production versions, oldest first
    archived: tuple[str, ...] = ()  # versions retired from production

    def stage_of(self, version: str) -> Stage:
        if version == self.production:
            return Stage.PRODUCTION
        if version in self.archived or version in self.history:
            return Stage.ARCHIVED
        return Stage.CANDIDATE


@dataclass(frozen=True)
class CatalogEntry:
    version: ModelVersion
    stage: Stage


# ---- pure transitions -------------------------------------------------------------------


def _check_expected(head: Head, expected: str | _Any | None) -> None:
    if expected is not ANY and head.production != expected:
        raise Aborted(
            f"model {head.model!r}: production is {head.production or 'unset'}, "
            f"expected {expected or 'unset'}; someone changed it first — re-read and retry"
        )


def plan_promote(head: Head, version: str, expected: str | _Any | None = ANY) -> Head:
    """``version`` becomes production; the previous one is remembered for rollback."""
    _check_expected(head, expected)
    if head.production == version:
        return head
    history = head.history
    if head.production is not None:
        history = (*history, head.production)[-MAX_HISTORY:]
    archived = tuple(v for v in head.archived if v != version)
    if head.production is not None and head.production not in archived:
        archived = (*archived, head.production)
    return replace(head, production=version, history=history, archived=archived)


def plan_rollback(head: Head, expected: str | _Any | None = ANY) -> Head:
    """The previous production version comes back; the current one is archived."""
    _check_expected(head, expected)
    if not head.history:
        raise FailedPrecondition(
            f"model {head.model!r} has no earlier production version to roll back to"
        )
    previous = head.history[-1]
    archived = tuple(v for v in head.archived if v != previous)
    if head.production is not None and head.production not in archived:
        archived = (*archived, head.production)
    return replace(head, production=previous, history=head.history[:-1], archived=archived)


def plan_archive(head: Head, version: str) -> Head:
    if version == head.production:
        raise FailedPrecondition(
            f"model {head.model!r} version {version} is in production; promote another first"
        )
    if version in head.archived:
        return head
    return replace(head, archived=(*head.archived, version))


# ---- documents ---------------------------------------------------------------------------


def _version_id(model: str, version: str) -> str:
    return f"version/{model}/{version}"


def _head_id(model: str) -> str:
    return f"head/{model}"


def version_document(v: ModelVersion) -> dict[str, Any]:
    return {
        "kind": "version",
        "model": v.model,
        "version": v.version,
        "artifact_url": v.artifact_url,
        "metrics": dict(v.metrics),
        "lineage": dict(v.lineage),
        "created_at": format_time(v.created_at),
    }


def version_from_document(source: Mapping[str, Any]) -> ModelVersion:
    try:
        return ModelVersion(
            model=str(source["model"]),
            version=str(source["version"]),
            artifact_url=str(source["artifact_url"]),
            created_at=parse_time(source.get("created_at"), "created_at"),
            metrics={str(k): float(v) for k, v in (source.get("metrics") or {}).items()},
            lineage=dict(source.get("lineage") or {}),
        )
    except (KeyError, TypeError, ValueError, AttributeError, InvalidArgument) as exc:
        raise MalformedDocument(f"bad model version document: {exc}") from exc


def head_document(head: Head, now: datetime) -> dict[str, Any]:
    return {
        "kind": "head",
        "model": head.model,
        "production": head.production,
        "history": list(head.history),
        "archived": list(head.archived),
        "updated_at": format_time(now),
    }


def _as_list(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):  # a one-element array comes back as a bare string sometimes
        return (raw,)
    if isinstance(raw, list):
        return tuple(str(v) for v in raw)
    raise MalformedDocument(f"expected a list of versions, got {raw!r}")


def head_from_document(source: Mapping[str, Any]) -> Head:
    production = source.get("production")
    return Head(
        model=str(source["model"]),
        production=None if production is None else str(production),
        history=_as_list(source.get("history")),
        archived=_as_list(source.get("archived")),
    )


class Catalog:
    """Every published model version, with promote / rollback / archive."""

    def __init__(
        self,
        es: AsyncElasticsearch,
        indices: Indices,
        *,
        clock: WallClock = utc_now,
        attempts: int = DEFAULT_ATTEMPTS,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if attempts < 1:
            raise InvalidArgument("attempts must be at least 1")
        self._es = es
        self._index = indices.models
        self._clock = clock
        self._attempts = attempts
        self._sleep = sleep

    async def publish(self, version: ModelVersion) -> CatalogEntry:
        """Records a new version as a candidate; publishing the same version twice fails."""
        try:
            await self._es.index(
                index=self._index,
                id=_version_id(version.model, version.version),
                document=version_document(version),
                op_type="create",
                refresh=True,
            )
        except ConflictError as exc:
            raise AlreadyExists(
                f"model {version.model!r} version {version.version} is already published"
            ) from exc
        head, _ = await self._read_head(version.model)
        return CatalogEntry(version, head.stage_of(version.version))

    async def get(self, model: str, version: str) -> CatalogEntry:
        version_doc = await self._get_version(model, version)
        head, _ = await self._read_head(model)
        return CatalogEntry(version_doc, head.stage_of(version))

    async def head(self, model: str) -> Head:
        head, _ = await self._read_head(model)
        return head

    async def production(self, model: str) -> ModelVersion | None:
        head, _ = await self._read_head(model)
        return None if head.production is None else await self._get_version(model, head.production)

    async def list(self, model: str | None = None) -> list[CatalogEntry]:
        """Versions (of one model or all) by model, then publication time; bad docs skipped."""
        filters: list[dict[str, Any]] = []
        if model is not None:
            filters.append({"term": {"model": model}})
        response = await self._es.search(
            index=self._index,
            query={"bool": {"filter": filters}},
            size=10_000,
            ignore_unavailable=True,
        )
        heads: dict[str, Head] = {}
        versions: list[ModelVersion] = []
        for hit in response["hits"]["hits"]:
            source = hit["_source"]
            try:
                if source.get("kind") == "head":
                    head = head_from_document(source)
                    heads[head.model] = head
                else:
                    versions.append(version_from_document(source))
            except (MalformedDocument, KeyError) as exc:
                log.warning("skipping malformed catalog document %r: %s", hit.get("_id"), exc)
        versions.sort(key=lambda v: (v.model, v.created_at, v.version))
        return [
            CatalogEntry(v, heads.get(v.model, Head(v.model)).stage_of(v.version)) for v in versions
        ]

    async def promote(
        self, model: str, version: str, *, expected_production: str | _Any | None = ANY
    ) -> Head:
        """Makes ``version`` production. ``expected_production`` guards against a racing change."""
        await self._get_version(model, version)  # NotFound before touching the head
        return await self._change(model, lambda h: plan_promote(h, version, expected_production))

    async def rollback(self, model: str, *, expected_production: str | _Any | None = ANY) -> Head:
        """Restores the previous production version."""
        return await self._change(model, lambda h: plan_rollback(h, expected_production))

    async def archive(self, model: str, version: str) -> Head:
        await self._get_version(model, version)
        return await self._change(model, lambda h: plan_archive(h, version))

    async def _get_version(self, model: str, version: str) -> ModelVersion:
        try:
            response = await self._es.get(index=self._index, id=_version_id(model, version))
        except NotFoundError as exc:
            raise NotFound(f"model {model!r} version {version} is not in the catalog") from exc
        return version_from_document(response["_source"])

    async def _read_head(self, model: str) -> tuple[Head, tuple[int, int] | None]:
        try:
            response = await self._es.get(index=self._index, id=_head_id(model))
        except NotFoundError:
            return Head(model), None
        return head_from_document(response["_source"]), (
            response["_seq_no"],
            response["_primary_term"],
        )

    async def _change(self, model: str, plan: Callable[[Head], Head]) -> Head:
        """Read, plan, compare-and-set; on a lost race re-read and re-plan (bounded)."""
        for attempt in range(1, self._attempts + 1):
            head, seq = await self._read_head(model)
            new = plan(head)  # raises Aborted when a precondition no longer holds
            if new == head:
                return head
            document = head_document(new, self._clock())
            try:
                if seq is None:
                    await self._es.index(
                        index=self._index,
                        id=_head_id(model),
                        document=document,
                        op_type="create",
                        refresh=True,
                    )
                else:
                    await self._es.index(
                        index=self._index,
                        id=_head_id(model),
                        document=document,
                        if_seq_no=seq[0],
                        if_primary_term=seq[1],
                        refresh=True,
                    )
                return new
            except ConflictError:
                log.info("catalog change of %r lost a race (attempt %d); retrying", model, attempt)
                await self._sleep(0.01 * attempt)
        raise Aborted(
            f"model {model!r}: {self._attempts} attempts lost to concurrent catalog changes; "
            "try again"
        )
