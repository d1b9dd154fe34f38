"""The relay bytes-in/bytes-out: a gateway-mode ``Relay`` with in-memory transports.

A test feeds a client's bytes and each upstream connection's bytes and reads what the
relay wrote to each; nothing listens or connects. The relay needs a running event loop
(it reads the loop's clock and schedules its connects as tasks), so the harness owns
one and :meth:`MemoryRelay.run_callbacks` runs what is ready on it, never waiting.
Its clock stands still (:attr:`MemoryRelay.now`, moved only by :meth:`MemoryRelay.advance`)
and routing's random choices are seeded, so a run is the same every time: what Hypothesis
needs to replay and shrink a failure.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.config.client_tls import ClientTls
from mesh.config.loader import load_path
from mesh.config.snapshot import EMPTY
from mesh.proxy.downstream import Downstream
from mesh.proxy.pool import Upstream, UpstreamPool
from mesh.proxy.relay import Relay
from mesh.routing.discovery import EndpointTable, StaticDiscovery, StaticInstance
from mesh.routing.state import GatewayState

REPO = Path(__file__).resolve().parents[2]
#: The one inference worker the static endpoint table holds.
UPSTREAM = "127.0.0.1:9001"


class MemoryTransport(asyncio.Transport):
    """Keeps what the relay writes until it is read."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class MemoryPool(UpstreamPool):
    """Connects each new upstream connection to a :class:`MemoryTransport` at once."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay, None)
        #: Every upstream connection made, in order, with its transport.
        self.connections: list[tuple[Upstream, MemoryTransport]] = []

    async def _connect(
        self, conn: Upstream, *, internal: bool, timeout: float | None, tls: ClientTls
    ) -> None:
        transport = MemoryTransport()
        self.connections.append((conn, transport))
        conn.connection_made(transport)
        self.relay.flusher.flush()


class ManualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when told (timers fire when it passes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class MemoryRelay:
    """A gateway relay (the sample config, :data:`UPSTREAM` for the inference service)
    with one client connection; upstream connections appear in ``pool.connections``."""

    def __init__(self) -> None:
        self.loop = ManualClockLoop()
        self.relay: Relay = self.loop.run_until_complete(self._build())
        self.pool = MemoryPool(self.relay)
        self.relay.pool = self.pool
        self.client = Downstream(self.relay)
        self.client_transport = MemoryTransport()
        self.client.connection_made(self.client_transport)

    async def _build(self) -> Relay:
        config = EMPTY.merged(load_path(REPO / "config"), version=1, source="config")
        state = GatewayState(config, clock=self.loop.time, rng=random.Random(0))
        table = EndpointTable()
        discovery = StaticDiscovery([StaticInstance("inference", "w0", UPSTREAM)])
        async for update in discovery.updates():
            state.set_endpoints(table.apply(update))
            break
        return Relay(state, internal_address="127.0.0.1:1")

    def run_callbacks(self) -> None:
        """Runs the callbacks and tasks ready on the loop (connects, scheduled flushes)."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    def advance(self, seconds: float) -> None:
        """Moves the clock on and runs the timers now due (the relay's tick among them)."""
        self.loop.now += seconds
        self.run_callbacks()

    def call(self, function: Callable[[], object]) -> None:
        """Calls ``function`` on the running loop (as a protocol callback is), then runs
        the callbacks it made ready."""

        async def inside() -> None:
            function()

        self.loop.run_until_complete(inside())
        self.run_callbacks()

    def from_client(self, data: bytes) -> None:
        self.call(lambda: self.client.data_received(data))

    def from_upstream(self, conn: Upstream, data: bytes) -> None:
        self.call(lambda: conn.data_received(data))

    def upstream_lost(self, conn: Upstream) -> None:
        """The upstream closed its connection."""
        self.call(lambda: conn.connection_lost(None))

    def to_client(self) -> bytes:
        return self.client_transport.take()

    def close(self) -> None:
        self.relay.pool.close()
        self.loop.close()
