"""A header list the gateway accepts reaches the worker: one limit along the whole path."""

from __future__ import annotations

import pytest

from mesh.header_limits import MAX_HEADER_LIST
from tests.gateway.test_relay import relayed


@pytest.mark.parametrize("size", [20 * 1024, MAX_HEADER_LIST - 2048])
async def test_a_header_the_gateway_accepts_is_accepted_by_the_worker(size: int) -> None:
    """grpc-core's servers answered RESOURCE_EXHAUSTED above 8 KiB (some calls) and 16 KiB
    (all) while the relay accepts 64 KiB: a 20 KiB header passed the gateway and failed at
    the worker."""
    async with relayed() as s:
        # grpc-core applies its limits once its SETTINGS are acknowledged: the first call
        # on a connection would pass whatever they are.
        assert await s.unary(b"warm", timeout=10) == b"mraw"
        for _ in range(5):  # the soft limit refused a random share of calls
            got = await s.unary(b"abc", metadata=(("x-big", "v" * size),), timeout=10)
            assert got == b"cba"
