"""Regenerates the Python stubs from the .proto sources (`make protos`)."""

from __future__ import annotations

import shutil
import sys
import sysconfig
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

#: The repository root: proto imports are written relative to it
#: (``import "protos/meshserve/data/v1/data.proto"``), so generated modules
#: import each other as ``protos.meshserve...``.
ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"

#: Suffixes of everything protoc writes for one source file.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources(root: Path = ROOT) -> list[Path]:
    """All .proto files under protos/, relative to the repository root."""
    return sorted(p.relative_to(root) for p in (root / "protos").rglob("*.proto"))


def _plugin(name: str) -> str:
    # mypy-protobuf's plugins live beside the interpreter in the venv.
    scripts = Path(sysconfig.get_path("scripts"))
    candidate = scripts / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install the dev extra (mypy-protobuf)")
    return found


def generate(out_dir: Path, sources: Iterable[Path] | None = None) -> list[Path]:
    """Runs protoc for every source into ``out_dir``; returns the files written."""
    srcs = [str(s) for s in (sources if sources is not None else proto_sources())]
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *srcs,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    generated_root = out_dir / "protos"
    written = [
        p for p in generated_root.rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    ]
    for directory in {p.parent for p in written}:
        # Every generated folder must be a package for `protos.x.y` imports.
        walk = directory
        while walk != out_dir and walk.is_relative_to(generated_root):
            (walk / "__init__.py").touch(exist_ok=True)
            walk = walk.parent
    return sorted(written)


def normalise(text: str) -> str:
    """Drops the lines that carry the generator's version, which vary by install."""
    skip = ("# Protobuf Python Version:", "GRPC_GENERATED_VERSION =", "_version_not_supported")
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith(skip))


def main() -> int:
    for old in PROTO_DIR.rglob("*"):
        if old.is_file() and old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    written = generate(ROOT)
    print(f"generated {len(written)} files from {len(proto_sources())} protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
