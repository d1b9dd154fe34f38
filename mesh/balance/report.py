"""The load report a worker attaches to its responses, and its wire form.

A contract between a worker (which writes it as trailing metadata) and its sidecar (which
reads it and publishes it in the registry for load-aware balancing), so it lives in the
mesh core, below both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadReport:
    """How busy the worker is: what a sidecar feeds to load-aware balancing.

    Sent as trailing metadata on every ServerReady and ModelReady response under the
    ``x-meshserve-*`` keys of :meth:`metadata`, and on ModelInfer responses when the
    loaded versions changed or now and then (workers/inference/reporting.py).
    """

    in_flight: int
    queue_depth: int
    loaded_versions: tuple[str, ...]
    memory_bytes: int
    memory_budget_bytes: int

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            ("x-meshserve-in-flight", str(self.in_flight)),
            ("x-meshserve-queue-depth", str(self.queue_depth)),
            ("x-meshserve-loaded-versions", ",".join(self.loaded_versions)),
            ("x-meshserve-memory-bytes", str(self.memory_bytes)),
            ("x-meshserve-memory-budget-bytes", str(self.memory_budget_bytes)),
        )

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]]) -> LoadReport:
        """Parses the trailing metadata a worker sent (for sidecars and tests)."""
        values = {k: v.decode() if isinstance(v, bytes) else v for k, v in metadata}
        loaded = values.get("x-meshserve-loaded-versions", "")
        return cls(
            in_flight=int(values.get("x-meshserve-in-flight", "0")),
            queue_depth=int(values.get("x-meshserve-queue-depth", "0")),
            loaded_versions=tuple(v for v in loaded.split(",") if v),
            memory_bytes=int(values.get("x-meshserve-memory-bytes", "0")),
            memory_budget_bytes=int(values.get("x-meshserve-memory-budget-bytes", "0")),
        )
