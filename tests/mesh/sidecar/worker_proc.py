"""A fake inference worker as a process: ``python -m tests.mesh.sidecar.worker_proc NAME``."""

from __future__ import annotations

import asyncio
import sys

from mesh.server.app import ServerSettings, serve_until_signal, start_server
from tests.gateway.backends import FakeWorker


async def main(name: str) -> None:
    serving = await start_server(ServerSettings(), FakeWorker(name).services())
    print(f"listening on {serving.port}", flush=True)
    await serve_until_signal(serving)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
