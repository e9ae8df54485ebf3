"""Batched sending (``DatagramSocket.send_batch``) and batched reading (``receive_some``): the
driver's fast paths must deliver exactly what the one-at-a-time paths deliver. (The kernel UDP
socket's batching is specified in ``tests/socket/test_udp_send_batch.py``.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from lattica.net import Connection, Endpoint
from sim_net import Network
from tests.datagram_batches import mixed_batch, receive_datagrams

from .conftest import MakeEndpoint


async def test_sim_socket_send_batch_delivers_in_order_and_checks_addresses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=7) as net:
        sender = net.add_host("198.51.100.1").bind(4001)
        a = net.add_host("198.51.100.2").bind(4001)
        b = net.add_host("198.51.100.3").bind(4001)
        batch, expected_a, expected_b = mixed_batch(a.local_address, b.local_address)
        await sender.send_batch(batch)
        assert await receive_datagrams(a, len(expected_a)) == expected_a
        assert await receive_datagrams(b, len(expected_b)) == expected_b
        with pytest.raises(ValueError):
            await sender.send_batch([(b"x", ("198.51.100.2", 70000))])
        sender.close()
        with pytest.raises(trio.ClosedResourceError):
            await sender.send_batch([(b"x", a.local_address)])


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def _eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (a real network gives no event for "the peer's packets arrived")."""
    for _ in range(5000):
        if condition():
            return
        await trio.sleep(0.001)
    raise AssertionError("condition never became true")


async def _connected_stream_pair(make_endpoint: MakeEndpoint) -> tuple[Connection, Endpoint]:
    server = await make_endpoint()
    client = await make_endpoint()
    return await client.connect(server.local_address, expected_peer=server.peer_id), server


async def test_receive_some_returns_many_packets_worth_of_buffered_data_at_once(
    make_endpoint: MakeEndpoint,
) -> None:
    conn, server = await _connected_stream_pair(make_endpoint)
    payload = bytes(range(256)) * 800  # 204,800 bytes: about 180 QUIC packets
    stream = await conn.open_stream()
    await stream.send_all(payload)
    await stream.send_eof()
    with trio.fail_after(5):
        await _eventually(lambda: bool(server.connections()))
        (inbound,) = server.connections()
        served = await inbound.accept_stream()
        # Wait until everything, EOF included, is buffered on our side.
        await _eventually(lambda: served._eof_received)
    first = await served.receive_some(150_000)
    second = await served.receive_some()
    assert (len(first), len(second)) == (150_000, 54_800)
    assert first + second == payload
    assert await served.receive_some() == b""
