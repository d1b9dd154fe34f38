"""A fake inference worker as a process: ``python -m tests.mesh.sidecar.worker_proc NAME``.

Traced when ``MESHSERVE_TRACES`` is set (see ``mesh.telemetry.setup``). Under ``meshserve
run`` it behaves as the real workers do: it listens where ``$MESHSERVE_WORKER_LISTEN`` says
(or on a loopback port, requiring the secret in ``$MESHSERVE_SIDECAR_SECRET_FILE``),
exits when its lifeline (``$MESHSERVE_PARENT_FD``) breaks, and removes its unit's folder
(``$MESHSERVE_UNIT_FOLDER``) on the way out.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc.aio

from mesh.server import lifeline
from mesh.server.app import ServerSettings, serve_until_signal, start_server
from mesh.server.sidecar_secret import read_secret
from mesh.sidecar.launcher import LISTEN_ENV, SECRET_FILE_ENV
from mesh.telemetry.interceptors import TelemetryServerInterceptor
from mesh.telemetry.setup import TelemetrySettings, setup
from tests.gateway.backends import FakeWorker


async def main(name: str) -> None:
    telemetry = setup(TelemetrySettings.from_env(service_name=f"worker/{name}"))
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if telemetry.settings.traces != "none":
        interceptors.append(TelemetryServerInterceptor(telemetry))
    listen = os.environ.get(LISTEN_ENV)
    secret_file = os.environ.get(SECRET_FILE_ENV)
    secret = read_secret(Path(secret_file)) if secret_file else None
    settings = ServerSettings(host=listen or "127.0.0.1", sidecar_secret=secret)
    serving = await start_server(settings, FakeWorker(name).services(), interceptors=interceptors)
    print(f"{name} listening on {serving.address} pid {os.getpid()}", flush=True)
    try:
        await serve_until_signal(serving)
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    lifeline.watch_from_env()
    asyncio.run(main(sys.argv[1]))
