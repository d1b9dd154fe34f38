"""Records each published model version in the registry's model catalog (stage: candidate)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from mesh.errors import AlreadyExists
from registry.catalog import Catalog, ModelVersion
from registry.instances import utc_now

log = logging.getLogger(__name__)


class CatalogRecorder:
    """A ``publish.VersionRecorder`` that writes the version into ``registry.catalog``.

    The catalog entry carries the version directory as its artifact URL, the job's final
    metrics, and the whole lineage (job id, dataset name/version/sha256, spec, step). A
    version is published into the catalog once: recording it again (a worker that died
    after recording but before noting it, then resumed the job) is not an error.
    """

    def __init__(self, catalog: Catalog, clock: Callable[[], datetime] = utc_now) -> None:
        self._catalog = catalog
        self._clock = clock

    async def record(self, model: str, version: int, uri: str, lineage: Mapping[str, Any]) -> None:
        metrics = {str(k): float(v) for k, v in (lineage.get("metrics") or {}).items()}
        entry = ModelVersion(
            model=model,
            version=str(version),
            artifact_url=uri,
            created_at=self._clock(),
            metrics=metrics,
            lineage=dict(lineage),
        )
        try:
            await self._catalog.publish(entry)
        except AlreadyExists:
            log.info("%s version %d was already in the catalog", model, version)
            return
        log.info("recorded %s version %d in the model catalog as a candidate", model, version)
