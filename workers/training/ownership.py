"""Which training worker runs a job: the claims protocol, and the sole owner of a local store.

Several workers that share one job store (the registry's Elasticsearch) must never run the
same job twice, and must take over the jobs of a worker that died. Each job a worker runs
or queues is held under a renewable claim (a lease); a worker that cannot renew in time
stops the job without writing anything more, and another worker adopts it once the claim
has lapsed, resuming from the job's checkpoint.
"""

from __future__ import annotations

from typing import Protocol

from mesh.errors import Aborted


class OwnershipLost(Aborted):
    """This worker no longer holds the job's claim: another worker runs it now."""


class JobClaims(Protocol):
    """Leases on jobs; ``registry.jobs.ElasticJobClaims`` is the shared implementation."""

    #: This worker's id, as written into claims.
    owner: str
    #: Seconds a claim lasts without renewal.
    ttl_seconds: float
    #: Whether other workers may hold claims in the same store (then look for orphans).
    shared: bool

    async def claim(self, job_id: str) -> bool:
        """Takes the job (or renews it when ours); False when another worker holds it."""

    async def renew(self, job_id: str) -> bool:
        """Extends our claim; False when it is no longer ours."""

    async def release(self, job_id: str) -> None:
        """Gives the claim up, if it is still ours."""


class SoleOwner:
    """Claims for a store only this worker uses (the local directory): always granted."""

    shared = False

    def __init__(self, owner: str = "local", ttl_seconds: float = 3600.0) -> None:
        self.owner = owner
        self.ttl_seconds = ttl_seconds

    async def claim(self, job_id: str) -> bool:
        return True

    async def renew(self, job_id: str) -> bool:
        return True

    async def release(self, job_id: str) -> None:
        return None
