"""Stand-in inference workers for benchmarks, runnable as processes.

``echo``: answers ModelInfer at once (measures the proxy, not the model).
``cache``: a GPU that holds at most ``capacity`` model versions (LRU) and serves one
request at a time; a request for a version it does not hold pays ``load_ms`` first.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import OrderedDict

import grpc
import grpc.aio

from mesh.server.app import ServerSettings, Service, serve_until_signal, start_server
from protos.inference import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
Context = grpc.aio.ServicerContext[pb.ModelInferRequest, pb.ModelInferResponse]


class EchoWorker:
    def __init__(self, name: str) -> None:
        self.name = name

    async def infer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=self.name
        )


class CacheWorker(EchoWorker):
    def __init__(self, name: str, capacity: int, load_ms: float, infer_ms: float) -> None:
        super().__init__(name)
        self.capacity = capacity
        self.load_s = load_ms / 1000
        self.infer_s = infer_ms / 1000
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.device = asyncio.Lock()  # one GPU: one forward pass (or load) at a time
        self.loads = 0

    async def infer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        key = f"{request.model_name}/{request.model_version}"
        async with self.device:
            if key in self.loaded:
                self.loaded.move_to_end(key)
            else:
                self.loads += 1
                await asyncio.sleep(self.load_s)
                self.loaded[key] = None
                if len(self.loaded) > self.capacity:
                    self.loaded.popitem(last=False)
            await asyncio.sleep(self.infer_s)
        return await super().infer(request, context)


def service(worker: EchoWorker) -> Service:
    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "ModelInfer": grpc.unary_unary_rpc_method_handler(
                            worker.infer,
                            request_deserializer=pb.ModelInferRequest.FromString,
                            response_serializer=pb.ModelInferResponse.SerializeToString,
                        )
                    },
                )
            ]
        )

    return Service(SERVICE, register)


async def _main(args: argparse.Namespace) -> None:
    worker = (
        CacheWorker(args.name, args.capacity, args.load_ms, args.infer_ms)
        if args.kind == "cache"
        else EchoWorker(args.name)
    )
    serving = await start_server(ServerSettings(port=args.port), [service(worker)])
    print(f"{args.name} listening on {serving.address}", flush=True)
    await serve_until_signal(serving)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("echo", "cache"))
    parser.add_argument("--name", default="w0")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--load-ms", type=float, default=40.0)
    parser.add_argument("--infer-ms", type=float, default=2.0)
    asyncio.run(_main(parser.parse_args()))
