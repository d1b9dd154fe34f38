"""Tells a joining inference worker which versions the ring will send it, before it serves.

A worker started with ``--preload-wait`` reads its repository, loads nothing, and lists its
servable versions in ServerReady's trailers. The sidecar computes which of them the
gateway's ring gives this unit once it is SERVING (:func:`owned_versions`, with the
routing config and the service's SERVING endpoints plus this one) and answers with one
ServerReady carrying the list (mesh/balance/preload.py). The worker loads those first and
only then reports SERVING, which the sidecar mirrors into the registry: the gateway moves
a key here only once its weights are warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

from mesh.balance.preload import (
    ALL,
    PRELOAD_HEADER,
    SERVABLE_HEADER,
    Version,
    by_model,
    format_versions,
    parse_versions,
)
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: The versions a worker should load first, given its servable ones (None: no ring info).
Owner = Callable[[dict[str, list[int]]], Awaitable[frozenset[Version] | None]]
PROBE_TIMEOUT = 2.0


async def send_preload(
    channel: grpc.aio.Channel,
    owner: Owner,
    metadata: tuple[tuple[str, str], ...] = (),
    *,
    interval: float = 0.2,
    deadline_s: float = 120.0,
) -> frozenset[Version] | bool | None:
    """Waits for the worker to ask for a preload, answers it; returns what was sent.

    False when nothing was sent: the worker serves already, is not an inference worker of
    ours (it does not list its versions), or did not ask within ``deadline_s``.
    """
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        call = stub.ServerReady(pb.ServerReadyRequest(), timeout=PROBE_TIMEOUT, metadata=metadata)
        try:
            reply = await call
            trailers = dict((await call.trailing_metadata()) or ())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False  # not an inference worker
            await asyncio.sleep(interval)  # still starting
            continue
        servable = trailers.get(SERVABLE_HEADER)
        if servable is None:
            if reply.ready or not any(str(k).startswith("x-meshserve-") for k in trailers):
                return False  # serving already, or not ours: nothing to tell
            await asyncio.sleep(interval)
            continue
        text = servable.decode() if isinstance(servable, bytes) else servable
        try:
            owned = await owner(by_model(parse_versions(text)))
        except Exception:
            # The worker must still start: with no ring answer it loads everything.
            log.exception("could not work out the versions the ring gives this worker")
            owned = None
        value = ALL if owned is None else format_versions(owned)
        await stub.ServerReady(
            pb.ServerReadyRequest(),
            timeout=PROBE_TIMEOUT,
            metadata=(*metadata, (PRELOAD_HEADER, value)),
        )
        log.info("preload sent to the worker: %s", value or "no ring-owned version")
        return owned
    log.warning("the worker did not ask for a preload within %gs", deadline_s)
    return False
