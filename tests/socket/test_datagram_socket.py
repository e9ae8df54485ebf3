"""Specification of lattica.net.datagram.UdpSocket on the loopback interface (127.0.0.1)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from lattica.net.datagram import DatagramSocket, UdpSocket

LOOPBACK = "127.0.0.1"


@pytest.fixture
async def sender() -> AsyncIterator[UdpSocket]:
    sock = UdpSocket.bind(LOOPBACK)
    yield sock
    sock.close()


@pytest.fixture
async def receiver() -> AsyncIterator[UdpSocket]:
    sock = UdpSocket.bind(LOOPBACK)
    yield sock
    sock.close()


async def receive_exactly(sock: UdpSocket, count: int) -> list[tuple[bytes, tuple[str, int]]]:
    received: list[tuple[bytes, tuple[str, int]]] = []
    with trio.fail_after(5):
        while len(received) < count:
            received += await sock.receive_batch()
    return received


async def test_udp_socket_satisfies_the_datagram_socket_protocol() -> None:
    sock = UdpSocket.bind(LOOPBACK)
    try:
        assert isinstance(sock, DatagramSocket)
    finally:
        sock.close()


async def test_bind_to_port_zero_picks_a_free_port() -> None:
    a, b = UdpSocket.bind(LOOPBACK, 0), UdpSocket.bind(LOOPBACK, 0)
    try:
        assert a.local_address[0] == LOOPBACK
        assert a.local_address[1] != 0
        assert a.local_address != b.local_address
    finally:
        a.close()
        b.close()


async def test_binding_a_port_in_use_raises_os_error(receiver: UdpSocket) -> None:
    with pytest.raises(OSError):
        UdpSocket.bind(LOOPBACK, receiver.local_address[1])


async def test_a_datagram_arrives_with_its_sender_address(
    sender: UdpSocket, receiver: UdpSocket
) -> None:
    await sender.send_to(b"hello", receiver.local_address)
    assert await receive_exactly(receiver, 1) == [(b"hello", sender.local_address)]


async def test_receive_batch_returns_every_queued_datagram_at_once(
    sender: UdpSocket, receiver: UdpSocket
) -> None:
    sent = [b"one", b"two", b"three", b"four"]
    for data in sent:
        await sender.send_to(data, receiver.local_address)
    with trio.fail_after(5):
        batch = await receiver.receive_batch()
    assert batch == [(data, sender.local_address) for data in sent]


async def test_receive_batch_returns_at_most_max_datagrams(
    sender: UdpSocket, receiver: UdpSocket
) -> None:
    sent = [bytes([i]) for i in range(5)]
    for data in sent:
        await sender.send_to(data, receiver.local_address)
    with trio.fail_after(5):
        first = await receiver.receive_batch(max_datagrams=2)
        second = await receiver.receive_batch(max_datagrams=2)
        third = await receiver.receive_batch(max_datagrams=2)
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    assert [data for data, _ in first + second + third] == sent


async def test_receive_batch_waits_for_the_first_datagram(
    sender: UdpSocket, receiver: UdpSocket
) -> None:
    batches: list[list[tuple[bytes, tuple[str, int]]]] = []

    async def receive() -> None:
        batches.append(await receiver.receive_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert batches == []
        await sender.send_to(b"late", receiver.local_address)
    assert batches == [[(b"late", sender.local_address)]]


async def test_empty_and_large_datagrams_arrive_intact(
    sender: UdpSocket, receiver: UdpSocket
) -> None:
    large = bytes(range(256)) * 200  # 51 200 bytes, well under the UDP limit
    await sender.send_to(b"", receiver.local_address)
    await sender.send_to(large, receiver.local_address)
    received = await receive_exactly(receiver, 2)
    assert [data for data, _ in received] == [b"", large]


async def test_sending_to_a_port_nobody_listens_on_is_not_an_error(sender: UdpSocket) -> None:
    closed = UdpSocket.bind(LOOPBACK)
    nobody = closed.local_address
    closed.close()
    await sender.send_to(b"into the void", nobody)
    await sender.send_to(b"and again", nobody)
    # A later receive on the same socket still works.
    await sender.send_to(b"to myself", sender.local_address)
    assert await receive_exactly(sender, 1) == [(b"to myself", sender.local_address)]


# --- Closing ----------------------------------------------------------------------------------


async def test_receive_after_close_raises_closed_resource_error() -> None:
    sock = UdpSocket.bind(LOOPBACK)
    sock.close()
    with pytest.raises(trio.ClosedResourceError):
        await sock.receive_batch()


async def test_send_after_close_raises_closed_resource_error(receiver: UdpSocket) -> None:
    sock = UdpSocket.bind(LOOPBACK)
    sock.close()
    with pytest.raises(trio.ClosedResourceError):
        await sock.send_to(b"x", receiver.local_address)


async def test_close_wakes_a_receive_already_waiting_with_closed_resource_error() -> None:
    sock = UdpSocket.bind(LOOPBACK)
    outcome: list[BaseException] = []
    receive_finished = trio.Event()

    async def receive() -> None:
        try:
            await sock.receive_batch()
        except trio.ClosedResourceError as exc:
            outcome.append(exc)
        finally:
            receive_finished.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            assert not receive_finished.is_set()
            sock.close()
            await receive_finished.wait()
    assert len(outcome) == 1
    assert isinstance(outcome[0], trio.ClosedResourceError)


async def test_close_is_idempotent(receiver: UdpSocket) -> None:
    sock = UdpSocket.bind(LOOPBACK)
    sock.close()
    sock.close()
    with pytest.raises(trio.ClosedResourceError):
        await sock.receive_batch()
    with pytest.raises(trio.ClosedResourceError):
        await sock.send_to(b"x", receiver.local_address)


async def test_queued_datagrams_are_not_returned_after_close(
    sender: UdpSocket, receiver: UdpSocket
) -> None:
    await sender.send_to(b"queued", receiver.local_address)
    receiver.close()
    with pytest.raises(trio.ClosedResourceError):
        await receiver.receive_batch()
