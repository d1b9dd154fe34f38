"""The event loop the mesh's relay processes run on: asyncio's, or uvloop when asked.

The relay (gateway, sidecar) spends much of a proxied call's CPU outside its own Python:
the event loop's turns, transport reads and writes, TLS records (docs/benchmarks.md,
"The relay's per-call cost"). uvloop does that work in C on libuv: at concurrency 1 it
took 12-15 % off each relay's CPU per call. At concurrency 32 on the shared 2-core
machine the evidence was mixed (bench.sidecar's mesh path was slower on uvloop in every
run, other benchmarks were not), so it is opt-in until a quiet machine settles it:
``MESHSERVE_EVENT_LOOP=uvloop`` (required), ``auto`` (uvloop when installed, the extra
``meshserve[uvloop]``) or ``asyncio`` (the default). The relay's code is the same on both.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
#: ``asyncio`` (the default), ``uvloop`` (required) or ``auto`` (uvloop when installed).
LOOP_ENV = "MESHSERVE_EVENT_LOOP"
CHOICES = ("asyncio", "uvloop", "auto")


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop for ``choice`` (default: the environment's); None: asyncio's."""
    choice = (choice or os.environ.get(LOOP_ENV) or "asyncio").lower()
    if choice not in CHOICES:
        raise ValueError(f"{LOOP_ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError(f"{LOOP_ENV}=uvloop but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, choice: str | None = None) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks.

    What the process imported (grpc, protobuf descriptors, the OpenTelemetry SDK, the
    Elasticsearch client: ~80,000 objects) is never garbage, so it is moved out of the
    cycle collector's sight first (``gc.freeze``): its full collections otherwise walk all
    of it, ~50 ms each on this machine, in the middle of proxied calls.
    """
    gc.freeze()
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
