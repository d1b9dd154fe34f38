"""Index names and index templates (strict, explicit mappings) of the discovery store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elasticsearch import AsyncElasticsearch, BadRequestError

#: Our templates outrank Elasticsearch's built-in ones (priority 100..200) on any overlap.
TEMPLATE_PRIORITY = 500
#: Bumped whenever a mapping changes, so operators can see which layout an index has.
SCHEMA_VERSION = 1
#: Seconds until a write is searchable; a lease TTL must exceed heartbeat interval + this.
REFRESH_INTERVAL = 1.0

_KEYWORD = {"type": "keyword"}
_DATE = {"type": "date"}
_LONG = {"type": "long"}
# Kept in _source for readers, never indexed: arbitrary keys stay legal under dynamic: strict.
_OPAQUE = {"type": "object", "enabled": False}
_BLOB = {"type": "binary"}  # base64 in _source, not indexed or searchable
_TEXT_STORED = {"type": "text", "index": False}

INSTANCE_MAPPINGS: dict[str, Any] = {
    "service": _KEYWORD,
    "instance_id": _KEYWORD,
    "address": _KEYWORD,
    # Labels twice: "key=value" keywords to filter on (DestinationRule subsets), and the
    # mapping itself for readers; label keys may hold dots, which an indexed object would split.
    "labels": _KEYWORD,
    "label_map": _OPAQUE,
    "status": _KEYWORD,
    "models": {"properties": {"model": _KEYWORD, "version": _KEYWORD}},
    "load": {"properties": {"in_flight": _LONG, "queue_depth": _LONG, "memory_bytes": _LONG}},
    "registered_at": _DATE,
    "heartbeat_at": _DATE,
    "expires_at": _DATE,
    "ttl_ms": _LONG,
}

MODEL_MAPPINGS: dict[str, Any] = {
    # "version" documents: one per published version.
    "kind": _KEYWORD,
    "model": _KEYWORD,
    "version": _KEYWORD,
    "artifact_url": _KEYWORD,
    "metrics": _OPAQUE,
    "lineage": _OPAQUE,
    "created_at": _DATE,
    # "head" documents: one per model, the single point of truth for stages.
    "production": _KEYWORD,
    "history": _KEYWORD,
    "archived": _KEYWORD,
    "updated_at": _DATE,
}

CONFIG_MAPPINGS: dict[str, Any] = {
    "name": _KEYWORD,
    "version": _LONG,
    "yaml": _TEXT_STORED,
    "digest": _KEYWORD,
    "applied_at": _DATE,
    "applied_by": _KEYWORD,
}

JOB_MAPPINGS: dict[str, Any] = {
    "job_id": _KEYWORD,
    "model": _KEYWORD,
    "state": _KEYWORD,
    "created_at": _DATE,
    "updated_at": _DATE,
    "proto": _BLOB,
}

JOB_CLAIM_MAPPINGS: dict[str, Any] = {
    # Which training worker runs a job, and until when its lease holds (see registry.jobs).
    "job_id": _KEYWORD,
    "owner": _KEYWORD,
    "claimed_at": _DATE,
    "renewed_at": _DATE,
    "expires_at": _DATE,
    "ttl_ms": _LONG,
}

JOB_EVENT_MAPPINGS: dict[str, Any] = {
    "job_id": _KEYWORD,
    "sequence": _LONG,
    "time": _DATE,
    "proto": _BLOB,
}


@dataclass(frozen=True)
class Indices:
    """The index names of one mesh; ``prefix`` lets several meshes share a cluster."""

    prefix: str

    @property
    def instances(self) -> str:
        return f"{self.prefix}-instances"

    @property
    def models(self) -> str:
        return f"{self.prefix}-models"

    @property
    def config(self) -> str:
        return f"{self.prefix}-config"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}-jobs"

    @property
    def job_events(self) -> str:
        return f"{self.prefix}-job-events"

    @property
    def job_claims(self) -> str:
        return f"{self.prefix}-job-claims"

    def mappings(self) -> dict[str, dict[str, Any]]:
        """Index name → field mappings."""
        return {
            self.instances: INSTANCE_MAPPINGS,
            self.models: MODEL_MAPPINGS,
            self.config: CONFIG_MAPPINGS,
            self.jobs: JOB_MAPPINGS,
            self.job_events: JOB_EVENT_MAPPINGS,
            self.job_claims: JOB_CLAIM_MAPPINGS,
        }

    def all(self) -> list[str]:
        return list(self.mappings())


def index_template(index: str, properties: dict[str, Any]) -> dict[str, Any]:
    """The body of ``PUT _index_template/<index>`` for one of our indices."""
    return {
        # The exact name, not a wildcard: templates of meshes with different prefixes never
        # overlap (overlapping templates of equal priority are an error in Elasticsearch).
        "index_patterns": [index],
        "priority": TEMPLATE_PRIORITY,
        "template": {
            "settings": {
                "number_of_shards": 1,
                # One replica where a second node exists, none on a single node (green either
                # way), as Kibana does for its own system indices.
                "auto_expand_replicas": "0-1",
                # Explicit, so readers can rely on heartbeats being searchable within 1 s even
                # where a cluster default differs (or idle indices skip refreshes).
                "refresh_interval": f"{REFRESH_INTERVAL:g}s",
            },
            "mappings": {
                "dynamic": "strict",
                "_meta": {"meshserve_schema": SCHEMA_VERSION},
                "properties": properties,
            },
        },
        "_meta": {"meshserve_schema": SCHEMA_VERSION, "owner": "meshserve"},
    }


async def ensure_schema(es: AsyncElasticsearch, indices: Indices) -> None:
    """Creates (or refreshes) our templates and indices; safe to call from every process."""
    for index, properties in indices.mappings().items():
        body = index_template(index, properties)
        await es.indices.put_index_template(
            name=index,
            index_patterns=body["index_patterns"],
            priority=body["priority"],
            template=body["template"],
            meta=body["_meta"],
        )
        if not await es.indices.exists(index=index):
            try:
                await es.indices.create(index=index)
            except BadRequestError as exc:
                # Another process created it between our check and our create.
                if exc.error != "resource_already_exists_exception":
                    raise
