"""``meshserve infer``: one Open Inference Protocol request (JSON or ``.npy`` input) through the gateway."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from cli.endpoints import gateway_from_args
from cli.headers import add_header_argument, parse_headers
from mesh.cli_error import CliError
from mesh.routing import headers as md
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from registry.state_dir import add_state_dir_argument

out = Console()

#: OIP datatype -> numpy dtype (BYTES is handled apart: length-prefixed elements).
NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def parse_inputs(data: str | None, files: list[str], names: list[str]) -> dict[str, Any]:
    """Input arrays by name from ``-d`` JSON and ``--input NAME=FILE.npy``/``FILE.json``.

    JSON is either an array (the model's only input) or an object of arrays by input name.
    A bare array gets the name ``""``, filled in from the model's metadata.
    """
    inputs: dict[str, Any] = {}
    if data is not None:
        text = data
        if data.startswith("@"):
            try:
                text = Path(data[1:]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CliError(f"cannot read input {data[1:]}: {exc}") from exc
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"input is not JSON: {exc}") from exc
        if isinstance(value, dict):
            inputs.update(value)
        else:
            inputs[""] = value
    for spec in files:
        name, sep, path = spec.rpartition("=")
        file = Path(path)
        try:
            array = np.load(file) if file.suffix == ".npy" else json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read input {file}: {exc}") from exc
        inputs[name if sep else ""] = array
    if not inputs:
        raise CliError("no input: give -d JSON, -d @FILE.json or --input [NAME=]FILE.npy")
    if "" in inputs and len(inputs) > 1:
        raise CliError("an unnamed input is only allowed when it is the only one")
    return inputs


def _cast(name: str, value: Any, datatype: str) -> Any:
    """``value`` as a contiguous array of the input's datatype, refused where the cast
    would change the numbers (a complex part, a fraction or an overflow dropped); float
    precision may go (FP64 values sent as FP32)."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged lists
        raise CliError(f"input {name}: {exc}") from exc
    target = np.dtype(NUMPY[datatype])
    refused = CliError(f"input {name}: cannot send {array.dtype} values as {datatype}")
    if array.dtype.kind not in "biuf":
        raise refused
    with np.errstate(all="ignore"):
        cast = array.astype(target)
        if target.kind in "biu" and not np.array_equal(cast.astype(array.dtype), array):
            raise refused
    return np.ascontiguousarray(cast)


def build_request(
    model: str, version: str, metadata: pb.ModelMetadataResponse, inputs: dict[str, Any]
) -> pb.ModelInferRequest:
    """The request with raw contents, each input cast to the model's declared datatype."""
    declared = {t.name: t for t in metadata.inputs}
    if "" in inputs:
        if len(declared) != 1:
            raise CliError(
                f"model {model} has inputs {', '.join(declared)}: name them in a JSON object"
            )
        inputs = {next(iter(declared)): inputs[""]}
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, value in inputs.items():
        if name not in declared:
            raise CliError(f"model {model} has no input {name!r} (it has {', '.join(declared)})")
        datatype = declared[name].datatype
        if datatype == "BYTES":
            flat = np.asarray(value, dtype=np.object_)
            elements: list[bytes] = [
                v if isinstance(v, bytes) else str(v).encode() for v in flat.ravel().tolist()
            ]
            raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
            shape = flat.shape
        else:
            if datatype not in NUMPY:
                raise CliError(f"input {name}: datatype {datatype} is not supported by the CLI")
            array = _cast(name, value, datatype)
            raw, shape = array.tobytes(), array.shape
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(raw)
    return request


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, Any]:
    """Output arrays by name (raw contents, as the workers send them)."""
    result: dict[str, Any] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            values, offset = [], 0
            while offset < len(raw):
                size = int.from_bytes(raw[offset : offset + 4], "little")
                values.append(raw[offset + 4 : offset + 4 + size].decode(errors="replace"))
                offset += 4 + size
            result[tensor.name] = np.asarray(values, dtype=np.object_).reshape(shape)
        else:
            result[tensor.name] = np.frombuffer(raw, dtype=NUMPY[tensor.datatype]).reshape(shape)
    return result


def run(args: argparse.Namespace) -> int:
    inputs = parse_inputs(args.data, args.input, [])
    address = gateway_from_args(args, args.address)
    headers = parse_headers(args.header)
    metadata_headers = (*headers, *(((md.MODEL_VERSION, args.version),) if args.version else ()))
    with grpc.insecure_channel(address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=args.model, version=args.version),
            timeout=args.timeout,
            metadata=headers,
        )
        request = build_request(args.model, args.version, metadata, inputs)
        response = stub.ModelInfer(request, timeout=args.timeout, metadata=metadata_headers)
    outputs = decode_outputs(response)
    if args.json:
        print(
            json.dumps(
                {
                    "model_name": response.model_name,
                    "model_version": response.model_version,
                    "outputs": {k: v.tolist() for k, v in outputs.items()},
                }
            )
        )
        return 0
    table = Table(title=f"{response.model_name} version {response.model_version}")
    table.add_column("output")
    table.add_column("shape")
    table.add_column("values")
    for name, array in outputs.items():
        text = np.array2string(array, precision=4, threshold=64, suppress_small=True)
        table.add_row(name, str(list(array.shape)), text)
        if array.dtype.kind == "f" and array.ndim == 2 and name == "logits":
            table.add_row("argmax", str([array.shape[0]]), str(array.argmax(axis=1).tolist()))
    out.print(table)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="run one inference request through the gateway",
        description="Sends a ModelInfer request (inputs cast to the model's datatypes from "
        "ModelMetadata) and prints the outputs.",
    )
    parser.add_argument("model")
    parser.add_argument(
        "-d", "--data", help="JSON: an array (the only input) or {name: array}; @FILE reads a file"
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help=".npy or .json file for an input (repeatable)",
    )
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--address", default=None, help="gateway (default: the running up)")
    add_header_argument(parser)
    add_state_dir_argument(parser)
    parser.set_defaults(handler=run)
