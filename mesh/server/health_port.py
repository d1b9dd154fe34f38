"""A plaintext listener that answers a server's gRPC health and nothing else, for the kubelet.

The kubelet's ``grpc`` probes speak plaintext to the pod's IP: they can reach neither a
sidecar's mTLS port nor a worker that listens on localhost behind its sidecar's secret. A
sidecar serves this for its readiness probe (its health follows the worker's); a worker
serves it for its livenessProbe, on the service ``LIVENESS_SERVICE``, which stays SERVING
whatever the worker's readiness (a worker loading models is alive) and is answered from the
worker's own event loop, so a hung worker misses the probe's deadline and is restarted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:  # mesh.server.app starts one for a server whose settings ask for it
    from mesh.server.app import Serving

#: The health service name a livenessProbe asks for (``grpc.service``): SERVING while the
#: process answers at all, readiness aside (set once at start; only a drain changes it).
LIVENESS_SERVICE = "meshserve.liveness"


async def serve_health_port(serving: Serving, host: str, port: int) -> str:
    """Serves ``serving``'s health servicer alone, in plaintext, on ``host:port`` (0: any
    free); stopped when ``serving`` drains. Returns the address it bound."""
    await serving.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(serving.health, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {host}:{port} (health port): {exc}") from exc
    await server.start()

    async def stop() -> None:
        await server.stop(grace=None)

    serving.on_drain(stop)
    return f"{host}:{bound}"
