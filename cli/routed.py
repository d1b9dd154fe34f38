"""Whether the gateway routes to given units: what ``up`` and ``hosts up`` wait for before they
say the mesh is up, and ``restart`` before it says a unit is back.

A unit's ready line ("sidecar listening on ...") comes when its sidecar has registered the
instance NOT_SERVING; the worker reports SERVING later (once it has loaded its models), and
the gateway routes to it only after its registry watch has seen that. A command that says
"ready" at the ready line lets its user's first call, or the next step of a rolling restart,
meet a gateway with no (or one fewer) healthy endpoint. The gateway's own Admin
ListEndpoints is the answer that matters: healthy there is routable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence

import grpc

from mesh.cli_error import CliError
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc

#: Names a sidecar may listen on or register for this machine's loopback: a unit prints
#: ``127.0.0.1:PORT`` and its instance registers ``localhost:PORT``.
_LOOPBACK = frozenset({"localhost", "ip6-localhost", "127.0.0.1", "::1"})
#: How often the gateway is asked.
POLL_S = 0.2


def endpoint_key(address: str) -> tuple[str, str]:
    """``(host, port)`` of ``host:port`` / ``[v6]:port``, every loopback name as one."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return ("loopback" if host in _LOOPBACK else host, port)


def unrouted(addresses: Iterable[str], routed: Iterable[str]) -> list[str]:
    """The ``addresses`` (units' listening addresses) the gateway does not route to."""
    have = {endpoint_key(a) for a in routed}
    return [a for a in addresses if endpoint_key(a) not in have]


def routed_endpoints(
    gateway: str, metadata: Sequence[tuple[str, str]], timeout: float = 5.0
) -> set[str] | None:
    """Every endpoint, of any host, the gateway routes to now (SERVING and not ejected);
    None when the gateway does not answer."""
    with grpc.insecure_channel(gateway) as channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).ListEndpoints(
                admin_pb2.ListEndpointsRequest(), timeout=timeout, metadata=tuple(metadata)
            )
        except grpc.RpcError:
            return None
    return {
        e.address
        for group in reply.groups
        if not group.subset
        for e in group.endpoints
        if e.healthy and not e.ejected
    }


def wait_routed(
    gateway: str,
    metadata: Sequence[tuple[str, str]],
    units: dict[str, str],
    *,
    timeout: float,
    stopping: threading.Event | None = None,
) -> None:
    """Waits until the gateway routes to every unit (name → listening address).

    Raises CliError naming the units it still does not route to after ``timeout``, and
    KeyboardInterrupt when ``stopping`` is set meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        routed = routed_endpoints(gateway, metadata)
        missing = list(units.values()) if routed is None else unrouted(units.values(), routed)
        if not missing:
            return
        if stopping is not None and stopping.is_set():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            names = [name for name, address in units.items() if address in missing]
            raise CliError(
                f"timed out after {timeout:.0f} s waiting for the gateway {gateway} to route "
                f"to {', '.join(names)} (not registered SERVING yet: see their logs)"
            )
        time.sleep(POLL_S)
