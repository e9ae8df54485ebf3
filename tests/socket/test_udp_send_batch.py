"""Batched sending on kernel UDP sockets (``UdpSocket.send_batch``): segmentation offload and
its fallback deliver exactly what one-at-a-time sends deliver (real sockets on 127.0.0.1)."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio

from lattica.net.datagram import UdpSocket
from tests.datagram_batches import mixed_batch, receive_datagrams

LOOPBACK = "127.0.0.1"


async def test_udp_send_batch_delivers_every_datagram_in_order_with_its_boundaries() -> None:
    sender, a, b = UdpSocket.bind(LOOPBACK), UdpSocket.bind(LOOPBACK), UdpSocket.bind(LOOPBACK)
    try:
        batch, expected_a, expected_b = mixed_batch(a.local_address, b.local_address)
        await sender.send_batch(batch)
        assert await receive_datagrams(a, len(expected_a)) == expected_a
        assert await receive_datagrams(b, len(expected_b)) == expected_b
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
        batch, expected_a, expected_b = mixed_batch(a.local_address, b.local_address)
        await sender.send_batch(batch)
        await sender.send_batch(batch)
        assert await receive_datagrams(a, 2 * len(expected_a)) == 2 * expected_a
        assert await receive_datagrams(b, 2 * len(expected_b)) == 2 * expected_b
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
