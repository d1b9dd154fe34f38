"""Applied routing configuration as numbered, immutable versions with compare-and-apply."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from elasticsearch import AsyncElasticsearch, ConflictError

from mesh.errors import Aborted, InvalidArgument, MeshError, NotFound
from registry.connect import Sleep, backoff_delays, unreachable_as_unavailable
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

#: The routing configuration of a mesh; other names may hold other documents sets.
DEFAULT_NAME = "routing"
DEFAULT_POLL_INTERVAL = 1.0
#: How long reading or applying a version may take before the store counts as not
#: answering: under the CLI's 10 s deadline, so that `meshserve apply` against a frozen
#: store says why instead of DEADLINE_EXCEEDED.
STORE_DEADLINE_S = 5.0
#: Validates YAML text; raises (InvalidArgument or ValueError) naming the problem.
Validator = Callable[[str], object]


def accept_any(text: str) -> None:
    """The default validator: anything goes (validation belongs to the mesh config parser)."""


@dataclass(frozen=True)
class ConfigVersion:
    """One applied configuration; versions start at 1 and have no gaps."""

    name: str
    version: int
    yaml: str
    digest: str
    applied_at: datetime
    applied_by: str


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _doc_id(name: str, version: int) -> str:
    # Zero-padded so ids sort like versions when someone lists them by hand.
    return f"{name}/{version:010d}"


def _from_source(source: dict[str, Any]) -> ConfigVersion:
    try:
        return ConfigVersion(
            name=str(source["name"]),
            version=int(source["version"]),
            yaml=str(source["yaml"]),
            digest=str(source["digest"]),
            applied_at=parse_time(source.get("applied_at"), "applied_at"),
            applied_by=str(source.get("applied_by", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedDocument(f"bad config document: {exc}") from exc


class ConfigStore:
    """Routing configuration history. ``apply`` writes version n+1 with ``op_type=create``:
    of two writers that both read version n, exactly one succeeds; the other gets ``Aborted``.
    """

    def __init__(
        self,
        es: AsyncElasticsearch,
        indices: Indices,
        *,
        name: str = DEFAULT_NAME,
        validator: Validator = accept_any,
        clock: WallClock = utc_now,
    ) -> None:
        if not name or "/" in name:
            raise InvalidArgument(f"config name {name!r} must be non-empty without '/'")
        self._es = es
        self._index = indices.config
        self._name = name
        self._validator = validator
        self._clock = clock

    @unreachable_as_unavailable("the config store", deadline_s=STORE_DEADLINE_S)
    async def current(self) -> ConfigVersion | None:
        """The latest applied version, or None before the first apply."""
        found = await self._search({"range": {"version": {"gte": 1}}}, size=1, order="desc")
        return found[0] if found else None

    @unreachable_as_unavailable("the config store", deadline_s=STORE_DEADLINE_S)
    async def get(self, version: int) -> ConfigVersion:
        found = await self._search({"term": {"version": version}}, size=1, order="desc")
        if not found:
            raise NotFound(f"config {self._name!r} has no version {version}")
        return found[0]

    @unreachable_as_unavailable("the config store", deadline_s=STORE_DEADLINE_S)
    async def history(self, after: int = 0, size: int = 1000) -> list[ConfigVersion]:
        """Versions above ``after``, oldest first."""
        return await self._search({"range": {"version": {"gt": after}}}, size=size, order="asc")

    @unreachable_as_unavailable("the config store", deadline_s=STORE_DEADLINE_S)
    async def apply(
        self, text: str, *, expected_version: int | None = None, applied_by: str = ""
    ) -> ConfigVersion:
        """Validates and stores ``text`` as the next version.

        ``expected_version`` is the version the caller's change was based on (0 = none yet);
        a mismatch, or losing the race to write the next version, raises ``Aborted``.
        Applying text identical to the current version is a no-op that returns it.
        """
        try:
            self._validator(text)
        except MeshError:
            raise
        except ValueError as exc:
            raise InvalidArgument(f"config {self._name!r} rejected: {exc}") from exc
        current = await self.current()
        current_version = current.version if current is not None else 0
        if expected_version is not None and expected_version != current_version:
            raise Aborted(
                f"config {self._name!r} is at version {current_version}, not the expected "
                f"{expected_version}; re-read it and apply again"
            )
        if current is not None and current.digest == digest(text):
            return current
        applied = ConfigVersion(
            name=self._name,
            version=current_version + 1,
            yaml=text,
            digest=digest(text),
            applied_at=to_millis(self._clock()),
            applied_by=applied_by,
        )
        try:
            await self._es.index(
                index=self._index,
                id=_doc_id(self._name, applied.version),
                document={
                    "name": applied.name,
                    "version": applied.version,
                    "yaml": applied.yaml,
                    "digest": applied.digest,
                    "applied_at": format_time(applied.applied_at),
                    "applied_by": applied.applied_by,
                },
                op_type="create",
                refresh=True,
            )
        except ConflictError as exc:
            raise Aborted(
                f"config {self._name!r} version {applied.version} was applied concurrently; "
                "re-read it and apply again"
            ) from exc
        return applied

    async def watch(
        self,
        *,
        after: int = 0,
        interval: float = DEFAULT_POLL_INTERVAL,
        sleep: Sleep = asyncio.sleep,
    ) -> AsyncGenerator[ConfigVersion, None]:
        """Yields every version above ``after`` in order, then each new one as it lands.

        While the store is unreachable it backs off and keeps the position: nothing is
        skipped or repeated when it returns.
        """
        seen = after
        delays = backoff_delays(interval, 2.0, max(10.0, interval))
        while True:
            try:
                new = await self.history(after=seen)
            except Exception as exc:
                delay = next(delays)
                log.warning("config watch read failed; retrying in %.1fs: %s", delay, exc)
                await sleep(delay)
                continue
            delays = backoff_delays(interval, 2.0, max(10.0, interval))
            for version in new:
                seen = version.version
                yield version
            await sleep(interval)

    async def _search(self, query: dict[str, Any], *, size: int, order: str) -> list[ConfigVersion]:
        response = await self._es.search(
            index=self._index,
            query={"bool": {"filter": [{"term": {"name": self._name}}, query]}},
            sort=[{"version": order}],
            size=size,
            ignore_unavailable=True,
        )
        versions = []
        for hit in response["hits"]["hits"]:
            try:
                versions.append(_from_source(hit["_source"]))
            except MalformedDocument as exc:
                log.warning("skipping malformed config document %r: %s", hit.get("_id"), exc)
        return versions
