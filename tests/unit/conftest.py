"""Shared fixtures for unit tests: endpoints on an in-memory network (sim_net), no sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from lattica.identity import Identity
from lattica.net import DatagramSocket, Endpoint, EndpointConfig
from sim_net import Host, Network, SimSocket

MakeEndpoint = Callable[..., Awaitable[Endpoint]]
MakeSocket = Callable[[], SimSocket]

# Loopback-like: the unit tier keeps the addresses tests used with real sockets.
UNIT_HOST_IP = "127.0.0.1"


@pytest.fixture
async def unit_host() -> AsyncIterator[Host]:
    """One host on a perfect, zero-latency emulated network (seed 0)."""
    async with Network(seed=0) as network:
        yield network.add_host(UNIT_HOST_IP)


@pytest.fixture
def make_socket(unit_host: Host) -> MakeSocket:
    """Bind a datagram socket on the in-memory host (a free port each time)."""
    return lambda: unit_host.bind(0)


@pytest.fixture
def make_endpoint(nursery: trio.Nursery, make_socket: MakeSocket) -> MakeEndpoint:
    """Start endpoints on in-memory sockets; they stop when the test ends."""

    async def make(
        identity: Identity | None = None,
        config: EndpointConfig | None = None,
        socket: DatagramSocket | None = None,
    ) -> Endpoint:
        endpoint = Endpoint(identity or Identity.generate(), socket or make_socket(), config or EndpointConfig())
        await nursery.start(endpoint.run)
        return endpoint

    return make
