"""The model repository layout shared by the training worker (writer) and inference worker (reader).

Triton's layout, through fsspec (a local directory by default)::

    <repo>/<model>/config.pbtxt        inference.ModelConfig in protobuf text format
    <repo>/<model>/<version>/model.pt  TorchScript (platform "pytorch_libtorch"), or
    <repo>/<model>/<version>/model.pt2 a torch.export archive (platform "torch_export")
    <repo>/<model>/<version>/lineage.json   optional: metrics and lineage of the version

Version directories are positive integers. A version is published by writing it
under a hidden temporary name and renaming it into place, so a reader never sees
half a version; readers skip every name that is not a positive integer.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from google.protobuf import text_format

from protos.inference import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
LINEAGE_FILE = "lineage.json"
TORCHSCRIPT_PLATFORM = "pytorch_libtorch"
EXPORT_PLATFORM = "torch_export"
DEFAULT_FILENAMES = {TORCHSCRIPT_PLATFORM: "model.pt", EXPORT_PLATFORM: "model.pt2"}


class RepositoryError(Exception):
    """The repository holds something that does not follow the layout."""


def _is_version(name: str) -> bool:
    return name.isdigit() and int(name) > 0 and not name.startswith("0")


@dataclass(frozen=True)
class ModelRepo:
    """A model repository at an fsspec URL (``/path`` or ``file:///path``, ``s3://…``)."""

    url: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url)
        return fs

    @property
    def root(self) -> str:
        _, path = fsspec.core.url_to_fs(self.url)
        return str(path).rstrip("/")

    def model_path(self, model: str) -> str:
        return posixpath.join(self.root, model)

    def version_path(self, model: str, version: int) -> str:
        return posixpath.join(self.root, model, str(version))

    def present(self) -> bool:
        """Whether the repository's root exists (an empty one does)."""
        return bool(self.fs.exists(self.root))

    def list_models(self) -> list[str]:
        """Models that have a config file, sorted."""
        fs = self.fs
        if not fs.exists(self.root):
            return []
        names = []
        for entry in fs.ls(self.root, detail=False):
            name = posixpath.basename(str(entry).rstrip("/"))
            if not name.startswith(".") and fs.exists(posixpath.join(str(entry), CONFIG_FILE)):
                names.append(name)
        return sorted(names)

    def list_versions(self, model: str) -> list[int]:
        """Published versions of ``model``, ascending; temporary names are skipped."""
        fs = self.fs
        path = self.model_path(model)
        if not fs.exists(path):
            return []
        versions = []
        for entry in fs.ls(path, detail=True):
            name = posixpath.basename(str(entry["name"]).rstrip("/"))
            if entry["type"] == "directory" and _is_version(name):
                versions.append(int(name))
        return sorted(versions)

    def read_config(self, model: str) -> mc.ModelConfig:
        path = posixpath.join(self.model_path(model), CONFIG_FILE)
        try:
            with self.fs.open(path, "r") as f:
                text = f.read()
        except FileNotFoundError as exc:
            raise RepositoryError(f"model {model!r} has no {CONFIG_FILE}") from exc
        config = mc.ModelConfig()
        try:
            text_format.Parse(text, config)
        except text_format.ParseError as exc:
            # Named by model, not by path: the message reaches clients (Evaluate, a failed
            # load's status), which need not learn where the server keeps its repository.
            raise RepositoryError(f"model {model!r}: {CONFIG_FILE} does not parse: {exc}") from exc
        if not config.name:
            config.name = model
        return config

    def write_config(self, model: str, config: mc.ModelConfig) -> None:
        """Writes the model's config atomically (temporary file, then rename)."""
        fs = self.fs
        directory = self.model_path(model)
        fs.makedirs(directory, exist_ok=True)
        final = posixpath.join(directory, CONFIG_FILE)
        tmp = posixpath.join(directory, f".{CONFIG_FILE}.{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "w") as f:
            f.write(text_format.MessageToString(config))
        fs.mv(tmp, final)

    def read_lineage(self, model: str, version: int) -> dict[str, Any]:
        path = posixpath.join(self.version_path(model, version), LINEAGE_FILE)
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path, "r") as f:
            data: dict[str, Any] = json.load(f)
        return data

    def publish_version(
        self, model: str, files: Mapping[str, bytes], lineage: Mapping[str, Any] | None = None
    ) -> int:
        """Writes ``files`` as the next version of ``model``; returns its number.

        Everything is written under a hidden temporary directory first, then that
        directory is renamed to the version number. If another writer took the
        number in between, the next number is tried.
        """
        fs = self.fs
        model_dir = self.model_path(model)
        fs.makedirs(model_dir, exist_ok=True)
        tmp = posixpath.join(model_dir, f".tmp-{uuid.uuid4().hex}")
        fs.makedirs(tmp, exist_ok=True)
        try:
            for name, data in files.items():
                with fs.open(posixpath.join(tmp, name), "wb") as f:
                    f.write(data)
            if lineage is not None:
                with fs.open(posixpath.join(tmp, LINEAGE_FILE), "w") as f:
                    json.dump(dict(lineage), f, indent=2, sort_keys=True)
            for _ in range(100):
                version = (self.list_versions(model) or [0])[-1] + 1
                target = self.version_path(model, version)
                if fs.exists(target):
                    continue
                fs.mv(tmp, target, recursive=True)
                return version
            raise RepositoryError(f"could not claim a version number for {model!r}")
        finally:
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
