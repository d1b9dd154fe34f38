"""What a served version's model file holds, so polling notices a file replaced in place.

Triton's poll mode reloads a model whose files changed. A content hash says whether
they did; hashing a large model file on every poll would cost more than the poll
itself, so the file system's own stamp (size, mtime, inode; an object store's ETag)
is compared first and the file is hashed again only when the stamp moved.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from protos.inference import model_config_pb2 as mc
from workers.inference.model import Signature
from workers.model_repo import DEFAULT_FILENAMES, ModelRepo

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fingerprint:
    """A model file as last seen: its stamp (cheap to read) and its content digest."""

    stamp: tuple[tuple[str, str], ...]
    digest: str


def model_file(repo: ModelRepo, config: mc.ModelConfig, version: int) -> str:
    """The path of the file a version loads from (the config's name or the platform's)."""
    platform = Signature.from_config(config).platform
    filename = config.default_model_filename or DEFAULT_FILENAMES[platform]
    return posixpath.join(repo.version_path(config.name, version), filename)


def _stamp(repo: ModelRepo, path: str) -> tuple[tuple[str, str], ...]:
    info = repo.fs.info(path)
    # Every field but the name: whichever of size, mtime, inode, ETag, generation the
    # file system reports. A field that moves without a content change (a link
    # count) costs one extra hash, never a reload.
    return tuple(sorted((str(k), str(v)) for k, v in info.items() if k != "name"))


def take(repo: ModelRepo, config: mc.ModelConfig, version: int) -> Fingerprint | None:
    """The fingerprint of a version's model file now; None if it cannot be read (blocking)."""
    try:
        path = model_file(repo, config, version)
        # The stamp first: if the file is replaced while it is hashed, the next look
        # sees a newer stamp and hashes again.
        stamp = _stamp(repo, path)
        digest = hashlib.sha256()
        with repo.fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except Exception:
        # A missing or unreadable file is the loader's to report; it has no fingerprint.
        return None
    return Fingerprint(stamp, digest.hexdigest())


def recheck(
    repo: ModelRepo, config: mc.ModelConfig, version: int, previous: Fingerprint
) -> Fingerprint | None:
    """``previous`` if the file's stamp has not moved, else a fresh fingerprint (blocking)."""
    try:
        if _stamp(repo, model_file(repo, config, version)) == previous.stamp:
            return previous
    except Exception:
        return None
    return take(repo, config, version)
