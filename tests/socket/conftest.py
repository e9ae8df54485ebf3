"""The socket tier: tests that need kernel UDP sockets on 127.0.0.1 (the unit tier needs none)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from lattica.identity import Identity
from lattica.net import Endpoint, EndpointConfig, UdpSocket

MakeUdpEndpoint = Callable[..., Awaitable[Endpoint]]


@pytest.fixture
def make_udp_endpoint(nursery: trio.Nursery) -> MakeUdpEndpoint:
    """Start endpoints on real UDP sockets on 127.0.0.1; they stop when the test ends."""

    async def make(identity: Identity | None = None, config: EndpointConfig | None = None) -> Endpoint:
        endpoint = Endpoint(identity or Identity.generate(), UdpSocket.bind("127.0.0.1", 0), config or EndpointConfig())
        await nursery.start(endpoint.run)
        return endpoint

    return make
