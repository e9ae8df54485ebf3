"""Batched sending (``DatagramSocket.send_batch``) and batched reading (``receive_some``): the
driver's fast paths must deliver exactly what the one-at-a-time paths deliver."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from lattica.net import Connection, Endpoint
from lattica.net.datagram import Address, UdpSocket
from sim_net import Network

from .conftest import MakeEndpoint

LOOPBACK = "127.0.0.1"


async def _receive(sock: UdpSocket | Any, count: int) -> list[bytes]:
    received: list[bytes] = []
    with trio.fail_after(5):
        while len(received) < count:
            received += [data for data, _ in await sock.receive_batch()]
    return received


def _numbered(count: int, size: int, tag: int) -> list[bytes]:
    """``count`` distinct datagrams of ``size`` bytes, so order and boundaries are checkable."""
    return [bytes([tag]) + i.to_bytes(2, "big") + bytes(size - 3) for i in range(count)]


def _mixed_batch(a: Address, b: Address) -> tuple[list[tuple[bytes, Address]], list[bytes], list[bytes]]:
    # Runs of equal sizes (longer than one segmented send may carry), a shorter tail that ends a
    # run, a switch of destination and back, a larger datagram after smaller ones, an empty one.
    to_a = _numbered(100, 1200, 1) + _numbered(1, 300, 2) + _numbered(3, 1200, 3)
    to_b = _numbered(5, 1200, 4)
    later_a = _numbered(2, 500, 5) + _numbered(2, 1400, 6) + [b""]
    batch = [(d, a) for d in to_a] + [(d, b) for d in to_b] + [(d, a) for d in later_a]
    return batch, to_a + later_a, to_b


async def test_udp_send_batch_delivers_every_datagram_in_order_with_its_boundaries() -> None:
    sender, a, b = UdpSocket.bind(LOOPBACK), UdpSocket.bind(LOOPBACK), UdpSocket.bind(LOOPBACK)
    try:
        batch, expected_a, expected_b = _mixed_batch(a.local_address, b.local_address)
        await sender.send_batch(batch)
        assert await _receive(a, len(expected_a)) == expected_a
        assert await _receive(b, len(expected_b)) == expected_b
    finally:
        for sock in (sender, a, b):
            sock.close()


class _NoSegmentationSocket(socket.socket):
    """A UDP socket whose kernel refuses segmentation offload, as one without UDP_SEGMENT does."""

    segmented_attempts = 0

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        type(self).segmented_attempts += 1
        raise OSError(errno.EIO, "no checksum offload on this route")


async def test_udp_send_batch_falls_back_to_one_send_per_datagram_without_offload() -> None:
    raw = _NoSegmentationSocket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((LOOPBACK, 0))
    sender, a, b = UdpSocket(raw), UdpSocket.bind(LOOPBACK), UdpSocket.bind(LOOPBACK)
    try:
        batch, expected_a, expected_b = _mixed_batch(a.local_address, b.local_address)
        await sender.send_batch(batch)
        await sender.send_batch(batch)
        assert await _receive(a, 2 * len(expected_a)) == 2 * expected_a
        assert await _receive(b, 2 * len(expected_b)) == 2 * expected_b
        # It tried once, then stopped asking.
        assert _NoSegmentationSocket.segmented_attempts == 1
    finally:
        for sock in (sender, a, b):
            sock.close()


async def test_udp_send_batch_on_a_closed_socket_raises_closed_resource_error() -> None:
    sender, receiver = UdpSocket.bind(LOOPBACK), UdpSocket.bind(LOOPBACK)
    sender.close()
    try:
        with pytest.raises(trio.ClosedResourceError):
            await sender.send_batch([(b"x", receiver.local_address)])
    finally:
        receiver.close()


async def test_sim_socket_send_batch_delivers_in_order_and_checks_addresses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=7) as net:
        sender = net.add_host("198.51.100.1").bind(4001)
        a = net.add_host("198.51.100.2").bind(4001)
        b = net.add_host("198.51.100.3").bind(4001)
        batch, expected_a, expected_b = _mixed_batch(a.local_address, b.local_address)
        await sender.send_batch(batch)
        assert await _receive(a, len(expected_a)) == expected_a
        assert await _receive(b, len(expected_b)) == expected_b
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
