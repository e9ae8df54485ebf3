"""Batched sending on kernel UDP sockets (``UdpSocket.send_batch``): segmentation offload and
its fallback deliver exactly what one-at-a-time sends deliver (real sockets on 127.0.0.1)."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio

from lattica.net.datagram import Address, UdpSocket

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
