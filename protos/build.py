"""Regenerates the Python stubs from the .proto sources (`make protos`)."""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

#: The repository root.
ROOT = Path(__file__).resolve().parent.parent
#: The include root: proto imports are written relative to it
#: (``import "meshserve/data/v1/data.proto";``), the way every client
#: generator is run (``protoc -I protos``, docs/clients.md). The Python stubs
#: are generated the same way, so their descriptors carry the same file names
#: a Go or Node client sees, and :func:`fix_imports` moves their imports under
#: the ``protos`` package they are committed in.
PROTO_DIR = ROOT / "protos"
#: The Python package the stubs live in.
PACKAGE = "protos"

#: Suffixes of everything protoc writes for one source file.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """All .proto files under ``proto_dir``, relative to it (as protoc names them with -I)."""
    return sorted(p.relative_to(proto_dir) for p in proto_dir.rglob("*.proto"))


def _plugin(name: str) -> str:
    # mypy-protobuf's plugins live beside the interpreter in the venv.
    scripts = Path(sysconfig.get_path("scripts"))
    candidate = scripts / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install the dev extra (mypy-protobuf)")
    return found


def fix_imports(text: str, top_level: Iterable[str], package: str = PACKAGE) -> str:
    """Puts the generated modules' references to each other under ``package``.

    protoc names a generated module after the proto's path under the include
    root (``inference.model_config_pb2``) and has no option to prefix it; the
    stubs are importable as ``protos.inference…``, so the import lines (grpcio's
    and mypy-protobuf's alike: ``from inference import model_config_pb2 as …``)
    and the module name handed to the descriptor builder get the prefix.
    Descriptor file names and wire names are untouched.
    """
    names = "|".join(re.escape(name) for name in sorted(top_level))
    if not names:
        return text
    text = re.sub(rf"^from ({names})([. ])", rf"from {package}.\1\2", text, flags=re.MULTILINE)
    text = re.sub(rf"^import ({names})\.", rf"import {package}.\1.", text, flags=re.MULTILINE)
    return re.sub(
        rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(({names})\.)",
        rf"\1{package}.\2",
        text,
    )


def generate(out_dir: Path, sources: Iterable[Path] | None = None) -> list[Path]:
    """Runs protoc with ``-I protos`` for every source into ``out_dir`` (the package root).

    Returns the files written, import lines already fixed up.
    """
    srcs = sorted(sources) if sources is not None else proto_sources()
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(s) for s in srcs),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    top_level = {s.parts[0] for s in srcs}
    written = sorted(
        out_dir / s.parent / (s.stem + suffix) for s in srcs for suffix in GENERATED_SUFFIXES
    )
    for path in written:
        path.write_text(fix_imports(path.read_text(), top_level))
    for directory in {p.parent for p in written}:
        # Every generated folder must be a package for `protos.x.y` imports.
        walk = directory
        while walk != out_dir and walk.is_relative_to(out_dir):
            (walk / "__init__.py").touch(exist_ok=True)
            walk = walk.parent
    return written


def normalise(text: str) -> str:
    """Drops the lines that carry the generator's version, which vary by install."""
    skip = ("# Protobuf Python Version:", "GRPC_GENERATED_VERSION =", "_version_not_supported")
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith(skip))


def main() -> int:
    for old in PROTO_DIR.rglob("*"):
        if old.is_file() and old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    written = generate(PROTO_DIR)
    print(f"generated {len(written)} files from {len(proto_sources())} protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
