"""Virtual (relayed) paths in the endpoint: a connection whose datagrams travel through a
"circuit" -- here an in-memory pipe between two endpoints -- runs the same handshake and streams,
and ends when its path is closed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lattica.errors import ConnectError, LocalProtocolError
from lattica.identity import Identity
from lattica.net import Connection, Endpoint
from lattica.net.relayed_path import RelayedPath

from .conftest import MakeEndpoint

RELAY = Identity.generate().peer_id


async def pipe(nursery: trio.Nursery, a: Endpoint, b: Endpoint) -> tuple[RelayedPath, RelayedPath, list[int]]:
    """Open a virtual path on each endpoint whose datagrams arrive at the other one."""
    a_path = RelayedPath(RELAY, ("198.51.100.1", 4001), 1)
    b_path = RelayedPath(RELAY, ("198.51.100.1", 4001), 7)
    sent = [0]
    to_b_send, to_b = trio.open_memory_channel[bytes](256)
    to_a_send, to_a = trio.open_memory_channel[bytes](256)

    def send_from_a(datagram: bytes) -> None:
        sent[0] += 1
        to_b_send.send_nowait(datagram)

    a.open_virtual_path(a_path, send_from_a)
    b.open_virtual_path(b_path, to_a_send.send_nowait)

    async def deliver(channel: trio.MemoryReceiveChannel[bytes], endpoint: Endpoint, path: RelayedPath) -> None:
        async for datagram in channel:
            await endpoint.receive_virtual(path, [datagram])

    nursery.start_soon(deliver, to_b, b, b_path)
    nursery.start_soon(deliver, to_a, a, a_path)
    return a_path, b_path, sent


async def test_a_connection_over_a_virtual_path_authenticates_and_carries_streams(make_endpoint: MakeEndpoint) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    inbound_send, inbound = trio.open_memory_channel[Connection](4)
    bob.set_connection_handler(inbound_send.send_nowait)
    async with trio.open_nursery() as nursery:
        a_path, b_path, sent = await pipe(nursery, alice, bob)
        conn = await alice.connect(a_path, expected_peer=bob.peer_id)
        assert conn.peer_id == bob.peer_id and conn.path == a_path
        assert conn.relayed_via == RELAY and conn.remote_address == ("198.51.100.1", 4001)
        # The client may be authenticated before the server has checked its certificate.
        server = await inbound.receive()
        assert server.peer_id == alice.peer_id and server.path == b_path and server.relayed_via == RELAY
        stream = await conn.open_stream()
        await stream.send_all(b"through the circuit")
        await stream.send_eof()
        served = await server.accept_stream()
        assert await served.receive_some() == b"through the circuit"
        assert sent[0] > 0 and alice.stats.virtual_datagrams_sent == sent[0]
        assert bob.stats.virtual_datagrams_received > 0
        # Nothing of it went over the sockets.
        assert alice.stats.datagrams_sent == 0 and bob.stats.datagrams_sent == 0
        # Closing the path ends the connection on it.
        await alice.close_virtual_path(a_path)
        assert conn.is_closed
        nursery.cancel_scope.cancel()


async def test_dialling_a_path_that_is_not_open_fails_at_once(make_endpoint: MakeEndpoint) -> None:
    alice = await make_endpoint()
    with pytest.raises(ConnectError, match="not open"):
        await alice.connect(RelayedPath(RELAY, ("198.51.100.1", 4001), 3))


async def test_non_quic_and_unknown_path_datagrams_are_dropped(make_endpoint: MakeEndpoint) -> None:
    alice = await make_endpoint()
    raw: list[bytes] = []
    alice.set_raw_packet_handler(lambda data, _address: raw.append(data))
    path = RelayedPath(RELAY, ("198.51.100.1", 4001), 4)
    await alice.receive_virtual(path, [b"\x00\x01stun"])  # path not open: ignored
    assert alice.stats.datagrams_received == 0
    alice.open_virtual_path(path, lambda _datagram: None)
    await alice.receive_virtual(path, [b"\x00\x01stun", b""])
    assert raw == []  # STUN and punching speak to the socket only
    assert alice.stats.malformed_dropped == 2
    with pytest.raises(LocalProtocolError, match="already open"):
        alice.open_virtual_path(path, lambda _datagram: None)
