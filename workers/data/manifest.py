"""A committed dataset version's metadata and its JSON manifest format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mesh.errors import DataLoss
from workers.data.schema import DType, Schema, Task, TensorSpec
from workers.data.splits import SplitSpec
from workers.data.standardize import FeatureStats

#: Bumped when the manifest's meaning changes; readers refuse versions they do not know.
FORMAT = 1
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ChunkInfo:
    """One chunk file: its records are consecutive examples in stored order.

    The file holds every column's rows back to back, in schema order (features
    then labels), each little-endian, row-major, no padding, no header.
    """

    file: str
    num_records: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the manifest of one committed version records."""

    name: str
    version: str
    schema: Schema
    num_examples: int
    num_train: int
    num_validation: int
    num_test: int
    sha256: str
    created_at: datetime
    size_bytes: int
    description: str
    source: str
    feature_stats: tuple[FeatureStats, ...]
    split: SplitSpec
    chunks: tuple[ChunkInfo, ...]

    def stats_for(self, column: str) -> FeatureStats:
        for stats in self.feature_stats:
            if stats.name == column:
                return stats
        raise KeyError(column)


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype.value, "shape": list(spec.shape)}


def to_json(info: DatasetInfo) -> str:
    body = {
        "format": FORMAT,
        "name": info.name,
        "version": info.version,
        "created_at": info.created_at.isoformat(),
        "description": info.description,
        "source": info.source,
        "schema": {
            "features": [_spec_json(s) for s in info.schema.features],
            "labels": [_spec_json(s) for s in info.schema.labels],
            "task": info.schema.task.value,
            "num_classes": info.schema.num_classes,
        },
        "split": {
            "validation_fraction": info.split.validation_fraction,
            "test_fraction": info.split.test_fraction,
            "seed": info.split.seed,
        },
        "num_examples": info.num_examples,
        "num_train": info.num_train,
        "num_validation": info.num_validation,
        "num_test": info.num_test,
        "sha256": info.sha256,
        "size_bytes": info.size_bytes,
        "feature_stats": [
            {"name": s.name, "mean": list(s.mean), "std": list(s.std)} for s in info.feature_stats
        ],
        "chunks": [
            {
                "file": c.file,
                "num_records": c.num_records,
                "size_bytes": c.size_bytes,
                "sha256": c.sha256,
            }
            for c in info.chunks
        ],
    }
    return json.dumps(body, indent=1)


def _spec(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(raw["name"]), DType(raw["dtype"]), tuple(int(d) for d in raw["shape"]))


def from_json(text: str, path: str) -> DatasetInfo:
    """Parses a manifest; anything malformed is DataLoss naming ``path``."""
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {raw.get('format')!r}")
        schema = raw["schema"]
        split = raw["split"]
        return DatasetInfo(
            name=str(raw["name"]),
            version=str(raw["version"]),
            schema=Schema(
                tuple(_spec(s) for s in schema["features"]),
                tuple(_spec(s) for s in schema["labels"]),
                Task(schema["task"]),
                int(schema["num_classes"]),
            ),
            num_examples=int(raw["num_examples"]),
            num_train=int(raw["num_train"]),
            num_validation=int(raw["num_validation"]),
            num_test=int(raw["num_test"]),
            sha256=str(raw["sha256"]),
            created_at=datetime.fromisoformat(raw["created_at"]),
            size_bytes=int(raw["size_bytes"]),
            description=str(raw["description"]),
            source=str(raw["source"]),
            feature_stats=tuple(
                FeatureStats(
                    str(s["name"]), tuple(map(float, s["mean"])), tuple(map(float, s["std"]))
                )
                for s in raw["feature_stats"]
            ),
            split=SplitSpec(
                float(split["validation_fraction"]),
                float(split["test_fraction"]),
                int(split["seed"]),
            ),
            chunks=tuple(
                ChunkInfo(
                    str(c["file"]), int(c["num_records"]), int(c["size_bytes"]), str(c["sha256"])
                )
                for c in raw["chunks"]
            ),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataLoss(f"manifest {path} is corrupt: {exc}") from exc
