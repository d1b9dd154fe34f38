"""``meshserve call SERVICE/METHOD -d JSON``: any gRPC method by server reflection, like grpcurl."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from rich.console import Console

from cli.endpoints import gateway_from_args
from cli.headers import Metadata, add_header_argument, parse_headers
from mesh.cli_error import CliError
from registry.state_dir import add_state_dir_argument

out = Console()


def split_target(target: str) -> tuple[str, str]:
    """``pkg.Service/Method`` or ``pkg.Service.Method`` → (service, method)."""
    target = target.lstrip("/")
    service, sep, method = target.rpartition("/")
    if not sep:
        service, sep, method = target.rpartition(".")
    if not sep or not service or not method:
        raise CliError(
            f"{target!r} is not SERVICE/METHOD (e.g. inference.GRPCInferenceService/ServerLive)"
        )
    return service, method


def find_method(pool: descriptor_pool.DescriptorPool, target: str) -> MethodDescriptor:
    service_name, method_name = split_target(target)
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError:
        raise CliError(
            f"the server has no service {service_name!r} (try `meshserve call list`)"
        ) from None
    method = service.methods_by_name.get(method_name)
    if method is None:
        raise CliError(
            f"{service_name} has no method {method_name!r}; it has "
            f"{', '.join(sorted(service.methods_by_name))}"
        )
    return method


def _serializer(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def call(
    channel: grpc.Channel,
    method: MethodDescriptor,
    body: str,
    metadata: Metadata,
    timeout: float,
) -> Iterator[dict[str, Any]]:
    """Sends one request built from JSON; yields the response(s) as JSON objects as they come."""
    if method.client_streaming:
        raise CliError(f"{method.full_name} streams requests: not supported by `meshserve call`")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    try:
        request = json_format.Parse(body or "{}", request_class())
    except json_format.ParseError as exc:
        raise CliError(f"request for {method.full_name}: {exc}") from exc
    path = f"/{method.containing_service.full_name}/{method.name}"

    def to_json(message: Any) -> dict[str, Any]:
        result: dict[str, Any] = json_format.MessageToDict(message)
        return result

    if method.server_streaming:
        stream = channel.unary_stream(
            path, request_serializer=_serializer, response_deserializer=response_class.FromString
        )
        for message in stream(request, timeout=timeout, metadata=tuple(metadata)):
            yield to_json(message)
        return
    unary = channel.unary_unary(
        path, request_serializer=_serializer, response_deserializer=response_class.FromString
    )
    yield to_json(unary(request, timeout=timeout, metadata=tuple(metadata)))


def run(args: argparse.Namespace) -> int:
    address = gateway_from_args(args, args.address)
    metadata = parse_headers(args.header)
    body = args.data or ""
    if body.startswith("@"):
        try:
            with open(body[1:], encoding="utf-8") as file:
                body = file.read()
        except UnicodeDecodeError as exc:
            raise CliError(f"{body[1:]}: not UTF-8 text (byte {exc.start})") from exc
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        if args.target == "list":
            for service in sorted(database.get_services()):
                print(service)
            return 0
        pool = descriptor_pool.DescriptorPool(database)
        method = find_method(pool, args.target)
        for response in call(channel, method, body, metadata, args.timeout):
            print(json.dumps(response, indent=2), flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "call",
        help="call any gRPC method by reflection (like grpcurl)",
        description="Fetches the method's descriptors by server reflection, builds the request "
        "from JSON and prints the response(s) as JSON. `meshserve call list` lists the services.",
    )
    parser.add_argument("target", help="SERVICE/METHOD, or `list`")
    parser.add_argument("-d", "--data", default="", help="request as JSON; @FILE reads a file")
    add_header_argument(parser)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")
    parser.add_argument(
        "--address", default=None, help="server (default: the running up's gateway)"
    )
    add_state_dir_argument(parser)
    parser.set_defaults(handler=run)
