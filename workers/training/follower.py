"""A training node other than node 0: runs its ranks of every job that spans the node group.

It takes no jobs itself. Its ranks wait at node 0's rendezvous (torch.distributed's TCP
store); when node 0 starts a job of the group's world size, they join, receive the job's
run configuration from rank 0 (a broadcast), train their shards reading batches from this
node's data service address, and leave together with node 0's ranks (a barrier after rank 0
has exported). Then the next job. It serves gRPC health so that ``meshserve run`` supervises
it like any worker, behind its sidecar (whose outbound port is the data address).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import socket
import time
from dataclasses import replace
from typing import Any

from mesh.server.app import ServerSettings, serve_until_signal, start_server
from workers.training.nodes import NodeGroup
from workers.training.process import COLLECTIVE_TIMEOUT, _die_with_parent

log = logging.getLogger(__name__)

READY_PREFIX = "meshserve training follower listening on "
#: How long a finished job's rendezvous may take to close before the next wait begins.
CLOSE_TIMEOUT_S = 60.0


def _rendezvous_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _rank(index: int, group: NodeGroup, data_address: str, device: str) -> None:
    """One local rank for one job: join, learn the job, train, leave with the others."""
    import torch.distributed as dist

    from workers.training.loop import RunConfig, train

    _die_with_parent()
    rank = group.ranks[index]
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=group.init_method,
        rank=rank,
        world_size=group.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0)
        config = received[0]
        assert isinstance(config, RunConfig)
        print(
            f"rank {rank} of {group.world_size} joined job {config.job_id} at {group.rendezvous}",
            flush=True,
        )
        # This node's own way to the data service; the job's ranks are node 0's business.
        train(replace(config, data_address=data_address, ranks=None), rank, lambda _: None)
        dist.barrier()
        print(f"rank {rank} finished job {config.job_id}", flush=True)
    finally:
        dist.destroy_process_group()


def follow(group: NodeGroup, data_address: str, device: str) -> None:
    """Runs this node's ranks of one job after another, forever (a process of its own)."""
    from torch.multiprocessing.spawn import spawn

    _die_with_parent()
    while True:
        # The previous job's store closes once node 0's rank 0 exits; joining it again
        # would make a group of the old job's leftovers.
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while _rendezvous_open(group.rendezvous) and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            spawn(  # type: ignore[no-untyped-call]
                _rank,
                args=(group, data_address, device),
                nprocs=group.ranks_per_node,
                join=True,
            )
        except Exception as exc:  # no job within the timeout, or a failed one: wait again
            log.info("training follower: %s", str(exc).strip().splitlines()[-1:] or exc)
            time.sleep(1.0)


async def run(group: NodeGroup, data_address: str, device: str, server: ServerSettings) -> None:
    """Serves health and follows node 0 until SIGTERM/SIGINT."""
    context = multiprocessing.get_context("spawn")
    follower = context.Process(
        # Not a daemon: it starts the ranks' processes (they die with it: _die_with_parent).
        target=follow,
        args=(group, data_address, device),
        name="training-follower",
    )
    serving = await start_server(server, [])
    follower.start()
    try:
        print(f"{READY_PREFIX}{serving.address}", flush=True)
        await serve_until_signal(serving)
    finally:
        follower.terminate()
        follower.join(10)
        with contextlib.suppress(ValueError):
            follower.kill()
