"""``-H`` on the commands that call for a user: parsed once, sent on every call they make."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from cli.headers import parse_headers
from cli.main import main
from mesh.cli_error import CliError
from protos.inference import grpc_service_pb2 as pb

KEY = "k-123"


def test_pairs_take_grpcurls_forms_and_bin_values_are_base64() -> None:
    assert parse_headers(["X-Api-Key: k", "a=b", "trace-bin: aGk"]) == (
        ("x-api-key", "k"),
        ("a", "b"),
        ("trace-bin", b"hi"),
    )


@pytest.mark.parametrize(
    ("pair", "named"),
    [
        ("novalue", "KEY: VALUE"),
        (": v", "KEY: VALUE"),
        ("bad key: v", "'bad key'"),
        ("grpc-timeout: 1S", "'grpc-timeout'"),
        ("x-bin: ***", "base64"),
        # grpc refused these deep in the call: "INTERNAL: Invalid metadata".
        ("k: caf\u00e9", "'k': the value must be printable ASCII"),
        ("k: a\x01b", "'k': the value must be printable ASCII"),
    ],
)
def test_a_bad_pair_is_named(pair: str, named: str) -> None:
    with pytest.raises(CliError, match=named):
        parse_headers([pair])


def _check(context: grpc.ServicerContext) -> None:
    """The data plane wants ``x-api-key`` on every call, as a gateway with
    ``dataPlane: authenticated`` does."""
    if dict(context.invocation_metadata()).get("x-api-key") != KEY:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-api-key")


def _metadata(
    request: pb.ModelMetadataRequest, context: grpc.ServicerContext
) -> pb.ModelMetadataResponse:
    _check(context)
    reply = pb.ModelMetadataResponse(name=request.name, versions=["1"])
    reply.inputs.add(name="x", datatype="FP32", shape=[-1])
    return reply


def _infer(request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
    _check(context)
    reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
    reply.outputs.add(name="y", datatype="FP32", shape=list(request.inputs[0].shape))
    reply.raw_output_contents.append(request.raw_input_contents[0])
    return reply


_SERVICE = grpc.method_handlers_generic_handler(
    "inference.GRPCInferenceService",
    {
        "ModelMetadata": grpc.unary_unary_rpc_method_handler(
            _metadata,
            request_deserializer=pb.ModelMetadataRequest.FromString,
            response_serializer=pb.ModelMetadataResponse.SerializeToString,
        ),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            _infer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        ),
    },
)


@pytest.fixture
def keyed_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((_SERVICE,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_infer_sends_its_headers_on_both_of_its_calls(
    keyed_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["infer", "m", "-d", "[1, 2]", "--json", "--address", keyed_server]
    assert main([*argv, "-H", f"x-api-key: {KEY}"]) == 0
    assert '"y": [1.0, 2.0]' in capsys.readouterr().out
    assert main(argv) == 1
    assert "UNAUTHENTICATED: missing or wrong x-api-key" in capsys.readouterr().err
