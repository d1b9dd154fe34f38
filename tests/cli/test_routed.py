"""What `up`, `hosts up` and `restart` wait for: the gateway routing to given units."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from cli.restart import routed_names
from cli.routed import endpoint_key, routed_endpoints, unrouted, wait_routed
from cli.supervision.processes import Component, after
from cli.supervision.units import UnitState, UnitStatus
from cli.up import outbound_port
from gateway.app import Gateway
from mesh.cli_error import CliError
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings
from tests.gateway.harness import ADMIN_METADATA, REPO, admin_guard, serve_workers


@pytest.mark.parametrize(
    ("unit", "registered", "same"),
    [
        # A unit prints the address it bound; its sidecar registers localhost for loopback.
        ("127.0.0.1:4100", "localhost:4100", True),
        ("[::1]:4100", "localhost:4100", True),
        ("10.77.0.3:4100", "10.77.0.3:4100", True),
        # Hosts of `hosts up` may share a port number: the host tells them apart.
        ("10.77.0.3:4100", "10.77.0.4:4100", False),
        ("127.0.0.1:4100", "localhost:4101", False),
    ],
)
def test_a_unit_is_known_by_its_host_and_port(unit: str, registered: str, same: bool) -> None:
    assert (endpoint_key(unit) == endpoint_key(registered)) is same
    assert unrouted([unit], [registered]) == ([] if same else [unit])


def test_the_way_out_of_a_unit_is_read_from_its_arguments() -> None:
    training = Component(
        "training worker 1", ("run", "training", "--outbound-port", "15001"), after("x")
    )
    assert outbound_port(training) == 15001
    assert outbound_port(Component("data worker 1", ("run", "data"), after("x"))) is None


async def test_wait_routed_returns_once_routed_and_names_the_units_that_are_not() -> None:
    async with AsyncExitStack() as stack:
        _, addresses = await serve_workers(stack, 2)
        discovery = StaticDiscovery(
            [StaticInstance("inference", f"w{i}", a) for i, a in enumerate(addresses)]
        )
        gateway = Gateway(discovery, config_dir=REPO / "config", guard=admin_guard())
        serving = await gateway.start(ServerSettings())
        stack.push_async_callback(serving.drain, grace=0)
        units = {f"inference worker {i + 1}": a for i, a in enumerate(addresses)}
        await asyncio.to_thread(wait_routed, serving.address, ADMIN_METADATA, units, timeout=10)
        routed = await asyncio.to_thread(routed_endpoints, serving.address, ADMIN_METADATA)
        assert routed is not None and unrouted(addresses, routed) == []

        # A unit the gateway has not seen SERVING (nothing registered it): named, in time.
        started = time.monotonic()
        with pytest.raises(CliError) as late:
            await asyncio.to_thread(
                wait_routed,
                serving.address,
                ADMIN_METADATA,
                {**units, "inference worker 3": "127.0.0.1:1"},
                timeout=0.5,
            )
        assert "to route to inference worker 3 (" in str(late.value)
        assert time.monotonic() - started < 5

        # Without the admin key the gateway tells nothing: no unit counts as routed.
        with pytest.raises(CliError) as refused:
            await asyncio.to_thread(wait_routed, serving.address, (), units, timeout=0.2)
        assert "to route to inference worker 1, inference worker 2 (" in str(refused.value)


def test_restart_awaits_the_units_the_gateway_routed_to_before() -> None:
    def unit(name: str, address: str) -> UnitStatus:
        return UnitStatus(name, UnitState.RUNNING, 1, address=address)

    units = (
        unit("store", "http://127.0.0.1:9200"),
        unit("inference worker 1", "127.0.0.1:4101"),
        unit("inference worker 2", "127.0.0.1:4102"),
        unit("gateway", "127.0.0.1:8080"),
        unit("data worker 1", ""),  # restarting: no address
    )
    routed = {"localhost:4101", "localhost:4102", "localhost:4103"}
    assert routed_names(units, routed) == {"inference worker 1", "inference worker 2"}
