"""Server reflection under both the v1 and v1alpha service names.

grpcio-reflection implements only ``grpc.reflection.v1alpha``. Clients such as
grpcurl ask for ``grpc.reflection.v1`` first, and the two protocols are the same
messages on the wire under another package name, so the v1alpha servicer also
answers the v1 method path through a generic handler.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME


def enable(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Adds reflection for ``service_names`` (plus itself) to ``server``."""
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                name,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
                        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            )
            for name in (V1_SERVICE, V1ALPHA_SERVICE)
        ]
    )
