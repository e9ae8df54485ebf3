"""Specification of lattica.net.datagram.UdpSocket on the loopback interface (127.0.0.1)."""

from __future__ import annotations

import socket
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


async def test_a_port_for_tcp_too_skips_a_number_a_tcp_socket_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    # A UDP pick whose number a TCP connection holds (what made a node fail to start) is
    # dropped for the next one.
    held = socket.create_server((LOOPBACK, 0))  # stands for a connection's local port
    taken = UdpSocket.bind(LOOPBACK, held.getsockname()[1])
    picks = iter([taken])
    real_bind = UdpSocket.bind.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        UdpSocket, "bind", classmethod(lambda cls, host, port=0: next(picks, None) or real_bind(cls, host, port))
    )
    try:
        chosen = UdpSocket.bind_with_tcp_port(LOOPBACK)
        assert chosen.local_address[1] != held.getsockname()[1]
        assert taken._closed  # the rejected pick was closed
        listener = socket.create_server((LOOPBACK, chosen.local_address[1]))  # TCP fits there
        listener.close()
        chosen.close()
    finally:
        held.close()


async def test_a_given_port_for_tcp_too_is_bound_as_given(receiver: UdpSocket) -> None:
    with pytest.raises(OSError):
        UdpSocket.bind_with_tcp_port(LOOPBACK, receiver.local_address[1])


async def test_binding_a_port_in_use_raises_os_error(receiver: UdpSocket) -> None:
    with pytest.raises(OSError):
        UdpSocket.bind(LOOPBACK, receiver.local_address[1])


async def test_a_datagram_arrives_with_its_sender_address(sender: UdpSocket, receiver: UdpSocket) -> None:
    await sender.send_to(b"hello", receiver.local_address)
    assert await receive_exactly(receiver, 1) == [(b"hello", sender.local_address)]


async def test_receive_batch_returns_every_queued_datagram_at_once(sender: UdpSocket, receiver: UdpSocket) -> None:
    sent = [b"one", b"two", b"three", b"four"]
    for data in sent:
        await sender.send_to(data, receiver.local_address)
    with trio.fail_after(5):
        batch = await receiver.receive_batch()
    assert batch == [(data, sender.local_address) for data in sent]


async def test_receive_batch_returns_at_most_max_datagrams(sender: UdpSocket, receiver: UdpSocket) -> None:
    sent = [bytes([i]) for i in range(5)]
    for data in sent:
        await sender.send_to(data, receiver.local_address)
    with trio.fail_after(5):
        first = await receiver.receive_batch(max_datagrams=2)
        second = await receiver.receive_batch(max_datagrams=2)
        third = await receiver.receive_batch(max_datagrams=2)
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    assert [data for data, _ in first + second + third] == sent


async def test_receive_batch_waits_for_the_first_datagram(sender: UdpSocket, receiver: UdpSocket) -> None:
    batches: list[list[tuple[bytes, tuple[str, int]]]] = []

    async def receive() -> None:
        batches.append(await receiver.receive_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert batches == []
        await sender.send_to(b"late", receiver.local_address)
    assert batches == [[(b"late", sender.local_address)]]


async def test_empty_and_large_datagrams_arrive_intact(sender: UdpSocket, receiver: UdpSocket) -> None:
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


async def test_queued_datagrams_are_not_returned_after_close(sender: UdpSocket, receiver: UdpSocket) -> None:
    await sender.send_to(b"queued", receiver.local_address)
    receiver.close()
    with pytest.raises(trio.ClosedResourceError):
        await receiver.receive_batch()


# --- destinations the node cannot send to, and dual-stack sockets (issue 8, A1/A5) -----------


RECEIVER_PORT = -1  # stands for the receiver's port in the cases below


@pytest.mark.parametrize(
    "destination",
    [
        pytest.param(("a\x00b", 4001), id="nul-byte"),  # sendto raised TypeError here
        pytest.param(("\udcff", 4001), id="unencodable"),  # and here
        # sendto would resolve a name synchronously (blocking the event loop) and deliver it.
        pytest.param(("localhost", RECEIVER_PORT), id="name"),
        pytest.param(("::1", 4001), id="ipv6-from-ipv4-socket"),
        pytest.param(("fe80::1%lo", 4001), id="zone-id"),
        pytest.param(("127.0.0.1", 0), id="port-0"),
        pytest.param(("127.0.0.1", 70000), id="port-out-of-range"),
    ],
)
async def test_an_unsendable_destination_is_dropped_not_raised(
    sender: UdpSocket, receiver: UdpSocket, destination: tuple[str, int]
) -> None:
    if destination[1] == RECEIVER_PORT:
        destination = (destination[0], receiver.local_address[1])
    await sender.send_to(b"lost", destination)
    await sender.send_batch([(b"lost", destination), (b"kept", receiver.local_address)])
    await sender.send_to(b"end", receiver.local_address)
    # The socket still works, and only the sendable datagrams arrived.
    assert [data for data, _ in await receive_exactly(receiver, 2)] == [b"kept", b"end"]


async def test_a_dual_stack_socket_reaches_ipv4_and_reports_ipv4_sources(receiver: UdpSocket) -> None:
    dual = UdpSocket.bind("::", 0)
    try:
        port = dual.local_address[1]
        await dual.send_to(b"to v4", receiver.local_address)
        [(data, source)] = await receive_exactly(receiver, 1)
        assert data == b"to v4" and source == (LOOPBACK, port)
        await receiver.send_to(b"from v4", (LOOPBACK, port))
        [(data, source)] = await receive_exactly(dual, 1)  # type: ignore[arg-type]
        # The kernel says ::ffff:127.0.0.1; the node sees one spelling of an IPv4 address.
        assert data == b"from v4" and source == receiver.local_address
        # IPv6 still works on the same socket.
        v6 = UdpSocket.bind("::1", 0)
        try:
            await dual.send_to(b"to v6", v6.local_address)
            [(data, source)] = await receive_exactly(v6, 1)
            assert data == b"to v6" and source == ("::1", port)
        finally:
            v6.close()
    finally:
        dual.close()
