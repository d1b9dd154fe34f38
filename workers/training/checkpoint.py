"""Atomic checkpoints and job outputs through fsspec: temporary name, then rename."""

from __future__ import annotations

import io
import posixpath
import uuid
from typing import Any

import fsspec
import torch

CHECKPOINT_FILE = "checkpoint.pt"
EXPORT_FILE = "model.pt"


class JobArtifacts:
    """The working directory of one job under the worker's ``--artifacts`` URL."""

    def __init__(self, artifacts_url: str, job_id: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(artifacts_url)
        self.root = posixpath.join(str(root).rstrip("/"), "jobs", job_id)

    @property
    def checkpoint_path(self) -> str:
        return posixpath.join(self.root, CHECKPOINT_FILE)

    @property
    def export_path(self) -> str:
        return posixpath.join(self.root, EXPORT_FILE)

    def write_atomic(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path), f".{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def save_checkpoint(self, state: dict[str, Any]) -> str:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.write_atomic(self.checkpoint_path, buffer.getvalue())
        return self.checkpoint_path

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.fs.exists(self.checkpoint_path):
            return None
        with self.fs.open(self.checkpoint_path, "rb") as f:
            data = f.read()
        # weights_only: a checkpoint is data, never code to run.
        state: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
        return state

    def read_export(self) -> bytes:
        with self.fs.open(self.export_path, "rb") as f:
            data: bytes = f.read()
        return data

    def remove(self) -> None:
        """Deletes the job's working files (checkpoints, the unpublished export)."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
