"""The pure parts of the user-facing commands: inputs for infer, call targets, traces, up.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cli.call import split_target
from cli.endpoints import default_gateway
from cli.infer import build_request, decode_outputs, parse_inputs
from cli.main import main
from cli.trace import read_spans, trace_tree
from cli.up import try_commands
from mesh.cli_error import CliError
from protos.inference import grpc_service_pb2 as pb
from registry.state_dir import UpEndpoints


def metadata(*inputs: tuple[str, str]) -> pb.ModelMetadataResponse:
    reply = pb.ModelMetadataResponse(name="m")
    for name, datatype in inputs:
        reply.inputs.add(name=name, datatype=datatype, shape=[-1, 2])
    return reply


def test_a_bare_json_array_feeds_the_only_input_cast_to_its_datatype() -> None:
    inputs = parse_inputs("[[1, 2], [3, 4]]", [], [])
    request = build_request("m", "", metadata(("x", "FP32")), inputs)
    assert request.inputs[0].name == "x" and list(request.inputs[0].shape) == [2, 2]
    decoded = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
    assert decoded.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_npy_inputs_are_read_by_name(tmp_path: Path) -> None:
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[7, 8]], dtype=np.int64))
    inputs = parse_inputs(None, [f"ids={path}"], [])
    request = build_request("m", "2", metadata(("ids", "INT64")), inputs)
    assert request.model_version == "2"
    assert np.frombuffer(request.raw_input_contents[0], dtype=np.int64).tolist() == [7, 8]


@pytest.mark.parametrize(
    ("data", "files", "message"),
    [
        (None, [], "no input"),
        ("[1,", [], "not JSON"),
    ],
)
def test_bad_inputs_are_one_line_errors(data: str | None, files: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message):
        parse_inputs(data, files, [])


def test_a_data_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """``-d @FILE`` of a binary file said only "'utf-8' codec can't decode byte 0xff"."""
    path = tmp_path / "input.json"
    path.write_bytes(b"\xff\xfe[1]")
    with pytest.raises(CliError, match=r"cannot read input .*input\.json: 'utf-8' codec"):
        parse_inputs(f"@{path}", [], [])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty.yaml: no resources to apply"),
        (b"---\n# nothing\n---\n", "empty.yaml: no resources to apply"),
        (b"\xff\xfekind: x\n", "empty.yaml: not UTF-8 text"),
    ],
)
def test_apply_refuses_files_without_resources_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    """Checked before any gateway is called (this one does not exist). An empty file
    was applied as a new version; a binary one failed without naming the file."""
    path = tmp_path / "empty.yaml"
    path.write_bytes(content)
    code = main(["config", "apply", "--gateway", "127.0.0.1:1", "--api-key", "k", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("value", "datatype", "words"),
    [
        (np.array([[1 + 2j, 3]], dtype=np.complex64), "FP32", "complex64 values as FP32"),
        ([[1.5, 2.0]], "INT32", "float64 values as INT32"),
        ([["a", "b"]], "FP32", "<U1 values as FP32"),
        ([[-1, 2]], "UINT8", "int64 values as UINT8"),
    ],
)
def test_values_an_input_cannot_hold_are_refused_not_cast(
    value: object, datatype: str, words: str
) -> None:
    """numpy's cast dropped the imaginary part of complex numbers and the fraction of
    floats sent to an integer model (with a warning on stderr at best): the model saw
    other numbers than the user's, and answered for them."""
    with pytest.raises(CliError, match=rf"input x: cannot send {words}"):
        build_request("m", "", metadata(("x", datatype)), {"x": value})


@pytest.mark.parametrize(
    ("value", "datatype"),
    [([[1, 2]], "FP32"), ([[1.5, 2]], "FP16"), ([[True, False]], "FP32"), ([[1, 2]], "INT8")],
)
def test_values_of_the_same_kind_are_cast(value: object, datatype: str) -> None:
    request = build_request("m", "", metadata(("x", datatype)), {"x": value})
    assert list(request.inputs[0].shape) == [1, 2]


def test_inputs_must_match_the_model() -> None:
    two = metadata(("a", "FP32"), ("b", "FP32"))
    with pytest.raises(CliError, match="name them"):
        build_request("m", "", two, {"": [[1, 2]]})
    with pytest.raises(CliError, match="no input 'c'"):
        build_request("m", "", two, {"c": [[1, 2]]})


def test_outputs_decode_from_raw_contents_including_bytes() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="y", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(np.array([[0.5, 1.5]], dtype=np.float32).tobytes())
    response.outputs.add(name="s", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(b"\x02\x00\x00\x00hi\x01\x00\x00\x00!")
    outputs = decode_outputs(response)
    assert outputs["y"].tolist() == [[0.5, 1.5]]
    assert outputs["s"].tolist() == ["hi", "!"]


def test_call_targets_take_grpcurl_and_path_forms() -> None:
    assert split_target("inference.GRPCInferenceService/ModelInfer") == (
        "inference.GRPCInferenceService",
        "ModelInfer",
    )
    assert split_target("/a.b.S/M") == ("a.b.S", "M")
    assert split_target("a.b.S.M") == ("a.b.S", "M")
    with pytest.raises(CliError, match="SERVICE/METHOD"):
        split_target("nothing")


def _span(span_id: str, parent: str | None, service: str, start: str) -> dict[str, object]:
    return {
        "name": "inference.GRPCInferenceService/ModelInfer",
        "context": {"trace_id": "0xabc", "span_id": span_id},
        "parent_id": parent,
        "kind": "SpanKind.SERVER",
        "start_time": f"2026-01-01T00:00:0{start}Z",
        "end_time": "2026-01-01T00:00:09Z",
        "attributes": {"meshserve.endpoint": "localhost:1"} if parent is None else {},
        "resource": {"attributes": {"service.name": service}},
    }


def test_trace_tree_nests_spans_under_their_parents_whatever_the_file_order() -> None:
    spans = [_span("0x2", "0x1", "sidecar/inference", "2"), _span("0x1", None, "gateway", "1")]
    tree = trace_tree(spans, "0xabc")
    (root,) = tree.children
    assert "gateway" in str(root.label) and "endpoint=localhost:1" in str(root.label)
    (child,) = root.children
    assert "sidecar/inference" in str(child.label)
    with pytest.raises(CliError, match="no spans"):
        trace_tree(spans, "0xdef")


def test_lines_of_a_span_file_that_are_not_spans_are_skipped(tmp_path: Path) -> None:
    """``meshserve trace --file`` of a JSON-lines file of something else (or a span file
    with a stray line) failed with a traceback: AttributeError: 'int' object has no
    attribute 'get'."""
    good = _span("0x1", None, "gateway", "1")
    stray = ["1", "[]", "{}", '{"context": 5}', '{"name": 3, "context": {}}', "not json"]
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join([*stray, json.dumps(good)]) + "\n")
    assert read_spans(path) == [good]
    path.write_text("\n".join(stray) + "\n")
    code = main(["trace", "--file", str(path)])
    assert code == 1  # "no ... request traced in FILE yet", not a traceback


def test_up_json_names_the_gateway_only_while_its_up_process_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHSERVE_GATEWAY", raising=False)
    endpoints = UpEndpoints("127.0.0.1:9999", "http://127.0.0.1:1", os.getpid(), {"gateway": "x"})
    endpoints.write(tmp_path)
    assert UpEndpoints.read(tmp_path) == endpoints
    assert default_gateway(tmp_path) == "127.0.0.1:9999"
    monkeypatch.setenv("MESHSERVE_GATEWAY", "10.0.0.1:8080")
    assert default_gateway(tmp_path) == "10.0.0.1:8080"
    monkeypatch.delenv("MESHSERVE_GATEWAY")
    raw = json.loads((tmp_path / "up.json").read_text())
    raw["pid"] = 2**22 + 12345  # above pid_max: no such process
    (tmp_path / "up.json").write_text(json.dumps(raw))
    assert UpEndpoints.read(tmp_path) is None
    assert default_gateway(tmp_path) == "127.0.0.1:8080"


def test_ups_suggestions_name_its_state_folder_unless_it_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "my state"
    suggested = try_commands("127.0.0.1:8080", other.resolve())
    assert suggested[0].startswith(f"export MESHSERVE_STATE_DIR='{other.resolve()}' ")
    assert "meshserve status" in suggested
    default = try_commands("127.0.0.1:8080", (tmp_path / ".meshserve").resolve())
    assert not any("MESHSERVE_STATE_DIR" in command for command in default)
    assert "grpcurl -plaintext 127.0.0.1:8080 list" in default


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--epochs", "99999999999999999999", "argument --epochs: 99999999999999999999 is out"),
        ("--batch-size", "99999999999", "argument --batch-size: 99999999999 is out of range"),
        ("--seed", "-1", "argument --seed: -1 is out of range [0, "),
        ("--hidden", "32,a", "argument --hidden: not an integer: 'a'"),
        ("--world-size", "x", "argument --world-size: not an integer: 'x'"),
    ],
)
def test_train_flags_out_of_a_job_specs_range_are_usage_errors(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, words: str
) -> None:
    """Protobuf's own check answered "error: Value out of range: 99999999999999999999",
    naming no flag; and "--hidden 32,a" "invalid literal for int() with base 10"."""
    with pytest.raises(SystemExit) as exited:
        main(["train", "demo", "--dataset", "d", flag, value])
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_call_names_a_request_file_that_is_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said only "'utf-8' codec can't decode byte 0xff in position 0"."""
    path = tmp_path / "req.json"
    path.write_bytes(b"\xff{}")
    code = main(["call", "--address", "127.0.0.1:1", "x.Y/Z", "-d", f"@{path}"])
    assert code == 1 and "req.json: not UTF-8 text (byte 0)" in capsys.readouterr().err
