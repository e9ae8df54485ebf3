"""The socket tier: tests that need kernel UDP sockets on 127.0.0.1 (the unit tier needs none)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from lattica.identity import Identity
from lattica.net import Endpoint, EndpointConfig, UdpSocket
from lattica.net.datagram import Address
from lattica.net.stream import QuicStream
from lattica.net.tcp_transport import TcpTransport

MakeUdpEndpoint = Callable[..., Awaitable[Endpoint]]


@pytest.fixture
def make_udp_endpoint(nursery: trio.Nursery) -> MakeUdpEndpoint:
    """Start endpoints on real UDP sockets on 127.0.0.1; they stop when the test ends."""

    async def make(identity: Identity | None = None, config: EndpointConfig | None = None) -> Endpoint:
        endpoint = Endpoint(identity or Identity.generate(), UdpSocket.bind("127.0.0.1", 0), config or EndpointConfig())
        await nursery.start(endpoint.run)
        return endpoint

    return make


StreamHandler = Callable[[QuicStream], Awaitable[None]]
MakeTransport = Callable[..., Awaitable[tuple[TcpTransport, Address]]]

FAST = EndpointConfig(handshake_timeout_s=2.0, stream_receive_window_bytes=256 * 1024)


async def echo(stream: QuicStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@pytest.fixture
def make_transport(nursery: trio.Nursery) -> MakeTransport:
    """``make_transport(identity, handler=None, config=FAST)``: a running transport listening
    on 127.0.0.1 (an ephemeral port) and its address."""

    async def make(
        identity: Identity | None = None,
        handler: StreamHandler | None = echo,
        config: EndpointConfig = FAST,
    ) -> tuple[TcpTransport, Address]:
        transport = TcpTransport(identity or Identity.generate(), config, stream_handler=handler)
        await nursery.start(transport.run)
        return transport, await transport.listen("127.0.0.1", 0)

    return make
