"""``python -m tests.support.bare_server``: a meshserve gRPC server with no services of its
own (health and reflection only), in a process a test can stop with SIGSTOP."""

from __future__ import annotations

import asyncio

from mesh.server.app import ServerSettings, start_server


async def main() -> None:
    server = await start_server(ServerSettings(), [])
    print(f"bare server listening on {server.address}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
