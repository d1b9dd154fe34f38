"""The floor: a minimal Open Inference Protocol server on the worker's stack, with no model.

Run: ``.venv/bin/python -m bench.oip_floor [--port 0] [--model mlp] [--features 64]``

It serves what Triton's perf_analyzer needs (ServerLive, ServerReady, ServerMetadata,
ModelReady, ModelMetadata, ModelConfig, ModelInfer) on ``grpc.aio``, as the inference worker does, and
answers each ModelInfer with its raw input unchanged: it parses the request, decodes the
raw contents into a tensor and encodes it back, and does nothing else (no interceptors,
no batching, no statistics, no load report). Whatever the worker spends beyond this
server's cost per request is the worker's own request path; bench.perf_analyzer measures
the two side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

import grpc
import grpc.aio
import torch

from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc

SERVICE = "inference.GRPCInferenceService"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class Floor:
    """An identity model ``name``: FP32 ``x`` [-1, features] in, the same as ``y`` out."""

    def __init__(self, name: str, features: int) -> None:
        self.name = name
        self.features = features

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="oip-floor", version="0")

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=request.name == self.name)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        response = pb.ModelMetadataResponse(name=self.name, versions=["1"], platform="floor")
        response.inputs.add(name="x", datatype="FP32", shape=[-1, self.features])
        response.outputs.add(name="y", datatype="FP32", shape=[-1, self.features])
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> Any:
        config = mc.ModelConfig(name=self.name, platform="floor", max_batch_size=64)
        config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[self.features])
        config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[self.features])
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        [tensor] = request.inputs
        # The decode and encode every inference server does, so the floor is not a memcpy.
        x = torch.frombuffer(bytearray(request.raw_input_contents[0]), dtype=torch.float32)
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=tensor.shape)
        response.raw_output_contents.append(x.numpy().tobytes())
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            behaviour = getattr(self, method.name, None)
            if behaviour is None or method.client_streaming:
                continue
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=getattr(pb, method.input_type.name).FromString,
                response_serializer=getattr(pb, method.output_type.name).SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def serve(host: str, port: int, name: str, features: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers([Floor(name, features).handler()])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    # bench.children.process reads the address from this line.
    print(f"floor listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--features", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.model, args.features))
    return 0


if __name__ == "__main__":
    sys.exit(main())
