"""Bulk lanes on 127.0.0.1: one stream per TLS-over-TCP connection, its records moved by a thread
of its own (lattica.net.tcp_lane). Behaviour of the stream, its bounds, its limits, and what
hostile or vanished peers do to it."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import weakref

import pytest
import trio
import trio.testing

from lattica.identity import Identity
from lattica.net import EndpointConfig, tcp_transport
from lattica.net.address import PeerAddr
from lattica.net.stream import QuicStream
from lattica.net.tcp_connection import RECEIVE_BYTES, tls_handshake
from lattica.net.tcp_lane import LANE_ACCEPTED, TcpLane
from lattica.net.tcp_lane import wait_deadline as lane_wait_deadline
from lattica.net.tcp_transport import (
    MAX_INBOUND_LANES_PER_IP,
    MAX_INBOUND_LANES_PER_PEER,
    LaneRefusedError,
    TcpTransport,
)
from lattica.net.tls_channel import ALPN_LANE_PROTOCOL, TlsChannel
from tests.socket.conftest import FAST, MakeTransport

TLS_RECORD_BYTES = 16 * 1024
LIMIT_S = 20.0  # every wait below is on an event; this only bounds a hang


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def read_all(stream: QuicStream) -> bytes:
    parts = []
    while data := await stream.receive_some():
        parts.append(data)
    return b"".join(parts)


class ReadToEnd:
    """A server handler that reads its stream to the end: ``result`` is the bytes, or the
    ``trio.BrokenResourceError`` that ended it; ``ended`` is set either way."""

    def __init__(self) -> None:
        self.ended = trio.Event()
        self.result: bytes | BaseException | None = None

    async def __call__(self, stream: QuicStream) -> None:
        try:
            self.result = await read_all(stream)
        except trio.BrokenResourceError as exc:
            self.result = exc
        finally:
            self.ended.set()


async def join(lane: TcpLane) -> bool:
    return await trio.to_thread.run_sync(lane.join_thread, LIMIT_S)


async def lane_to(client: TcpTransport, server: TcpTransport, address: tuple[str, int]) -> TcpLane:
    return await client.open_lane(PeerAddr(address, server.peer_id))


async def test_a_lane_carries_one_stream_both_ways_and_ends_its_thread(make_transport: MakeTransport) -> None:
    server, address = await make_transport()  # echoes
    client, _ = await make_transport()
    sent = payload(3 * 1024 * 1024 + 7, seed=1)
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        assert lane.peer_id == server.peer_id and lane.direction == "outbound"
        stream = await lane.open_stream()
        with pytest.raises(trio.BusyResourceError):
            await lane.open_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: stream.send_all(sent))
            received = bytearray()
            while len(received) < len(sent):
                received += await stream.receive_some()
        await stream.send_eof()
        assert await stream.receive_some() == b""  # the echo ended after our close_notify
        await stream.aclose()
        assert bytes(received) == sent
        assert await join(lane)
        await lane.wait_closed()
    assert server.lanes_admitted == 1 and client.lanes_opened == 1


async def test_a_framed_lane_hands_each_large_frame_over_whole_in_memory_of_its_own(
    make_transport: MakeTransport,
) -> None:
    # What the fetch's exchange stream gets (net.frame_receiver): every byte in order, each
    # frame of 64 KiB or more as one read-only view of exactly that frame, and a frame the peer
    # cut short by closing arrives as it was, for the reader's decoder to call truncated.
    server, address = await make_transport()  # echoes
    client, _ = await make_transport()
    sizes = [10, 70_000, 5, 1_048_600, 300, 65_532, 2_000_000]
    frames = [size.to_bytes(4, "big") + payload(size, seed=size) for size in sizes]
    sent = b"".join(frames) + (100_000).to_bytes(4, "big") + b"cut short"
    with trio.fail_after(LIMIT_S):
        lane = await client.open_lane(PeerAddr(address, server.peer_id), framed_receive=True)
        stream = await lane.open_stream()
        await stream.send_all(sent)
        await stream.send_eof()
        received: list[bytes | memoryview] = []
        while data := await stream.receive_buffer(4 << 20):
            received.append(data)
        await stream.aclose()
        assert await join(lane)
    assert b"".join(received) == sent
    views = [len(item) for item in received if isinstance(item, memoryview)]
    assert views == [len(f) for f in frames if 64 * 1024 <= len(f) <= 2 * 1024 * 1024]


async def test_send_eof_ends_one_direction_only(make_transport: MakeTransport) -> None:
    async def answer_after_eof(stream: QuicStream) -> None:
        request = await read_all(stream)  # up to the client's close_notify
        await stream.send_all(request[::-1])
        await stream.send_eof()

    server, address = await make_transport(handler=answer_after_eof)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        stream = await lane.open_stream()
        await stream.send_all(b"request")
        await stream.send_eof()
        assert await read_all(stream) == b"tseuqer"
        await stream.aclose()
        assert await join(lane)


async def test_a_slow_reader_bounds_what_the_lane_holds_for_it(make_transport: MakeTransport) -> None:
    total = 48 * 1024 * 1024

    async def flood(stream: QuicStream) -> None:
        block = payload(1024 * 1024, seed=2)
        for _ in range(total // len(block)):
            await stream.send_all(block)
        await stream.send_eof()

    server, address = await make_transport(handler=flood)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        stream = await lane.open_stream()
        await stream.send_all(b"go")
        received = most_held = 0
        while data := await stream.receive_some(64 * 1024):
            received += len(data)
            # Delivered to the stream and not read yet: the window plus one socket read (and the
            # part of a TLS record left from the read before) at most, however far behind the
            # reader is (the thread is much faster than this loop).
            most_held = max(most_held, lane._window_used)
            await trio.lowlevel.checkpoint()
        await stream.aclose()
    assert received == total
    assert most_held <= lane.receive_window_bytes + RECEIVE_BYTES + TLS_RECORD_BYTES
    assert most_held >= lane.receive_window_bytes // 2  # the bound was reached, not idle


async def test_closing_a_stream_midway_breaks_the_peers_reads(make_transport: MakeTransport) -> None:
    reader = ReadToEnd()
    server, address = await make_transport(handler=reader)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        stream = await lane.open_stream()
        await stream.send_all(b"half a request")
        await stream.aclose()  # no EOF: a reset, not an end
        await reader.ended.wait()
    assert isinstance(reader.result, trio.BrokenResourceError)


async def test_lanes_beyond_the_per_peer_limit_are_refused_until_one_ends(make_transport: MakeTransport) -> None:
    release = trio.Event()
    handlers_done = 0
    all_done = trio.Event()

    async def hold(stream: QuicStream) -> None:
        nonlocal handlers_done
        try:
            await release.wait()
        finally:
            handlers_done += 1
            if handlers_done == MAX_INBOUND_LANES_PER_PEER + 1:
                all_done.set()

    server, address = await make_transport(handler=hold)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lanes = [await lane_to(client, server, address) for _ in range(MAX_INBOUND_LANES_PER_PEER)]
        with pytest.raises(LaneRefusedError):
            await lane_to(client, server, address)
        assert server.lanes_refused == 1 and server.lanes_admitted == MAX_INBOUND_LANES_PER_PEER
        # Another peer id is not held back by this one's lanes.
        other, _ = await make_transport()
        extra = await lane_to(other, server, address)
        await (await extra.open_stream()).aclose()
        release.set()
        await all_done.wait()
        await trio.testing.wait_all_tasks_blocked()  # the server let go of their slots
        for lane in lanes:
            lane.close()
        again = await lane_to(client, server, address)
        again.close()
        for lane in [*lanes, again, extra]:
            assert await join(lane)


async def test_a_peer_sending_garbage_after_admission_ends_its_lane_only(make_transport: MakeTransport) -> None:
    outcomes_in, outcomes = trio.open_memory_channel[BaseException | bytes](2)

    async def reader(stream: QuicStream) -> None:
        try:
            outcomes_in.send_nowait(await read_all(stream))
        except trio.BrokenResourceError as exc:
            outcomes_in.send_nowait(exc)

    server, address = await make_transport(handler=reader)
    with trio.fail_after(LIMIT_S):
        tcp = await trio.open_tcp_stream(*address)
        channel = TlsChannel(Identity.generate(), is_client=True, alpn=ALPN_LANE_PROTOCOL)
        await tls_handshake(tcp, channel)
        admitted = b""
        while not admitted:
            admitted = channel.receive_data(await tcp.receive_some())
        assert admitted == LANE_ACCEPTED
        await tcp.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))  # a record that cannot decrypt
        assert "protocol error" in str(await outcomes.receive())
        assert await tcp.receive_some() == b""  # the server closed the socket
        await tcp.aclose()
        # The transport still serves lanes.
        client, _ = await make_transport()
        lane = await lane_to(client, server, address)
        stream = await lane.open_stream()
        await stream.send_all(b"fine")
        await stream.send_eof()
        assert await outcomes.receive() == b"fine"
        await stream.aclose()
        assert await join(lane)


async def test_a_silent_lane_is_closed_after_the_idle_timeout(make_transport: MakeTransport) -> None:
    reader = ReadToEnd()
    quick = EndpointConfig(handshake_timeout_s=2.0, idle_timeout_s=0.3)
    server, address = await make_transport(handler=reader, config=quick)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        await lane.open_stream()  # and say nothing
        await reader.ended.wait()
    assert isinstance(reader.result, trio.BrokenResourceError) and "nothing heard" in str(reader.result)
    with trio.fail_after(LIMIT_S):
        with pytest.raises(trio.BrokenResourceError):
            await lane.stream.receive_some()  # the server closed it without close_notify
    assert await join(lane)


async def test_a_peer_that_only_takes_what_we_send_is_not_idle(make_transport: MakeTransport) -> None:
    # Review finding: a slow fetcher inside a large block has nothing to say, and the seeder's
    # lane closed it as silent after idle_timeout_s. Taking our output is being there.
    sent = payload(20 * 64 * 1024, seed=9)

    async def serve(stream: QuicStream) -> None:
        for at in range(0, len(sent), 64 * 1024):  # a slow seeder: ~0.6 MB/s for 2 s
            await stream.send_all(sent[at : at + 64 * 1024])
            await trio.sleep(0.1)
        await stream.send_eof()

    quick = EndpointConfig(handshake_timeout_s=2.0, idle_timeout_s=0.3)
    server, address = await make_transport(handler=serve, config=quick)
    client, _ = await make_transport(config=FAST)
    received = bytearray()
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        stream = await lane.open_stream()
        await stream.send_all(b"go")  # then nothing more, for ~2 s
        while data := await stream.receive_some():
            received += data
        await stream.aclose()
    assert bytes(received) == sent


async def test_a_peer_that_reads_nothing_is_closed(make_transport: MakeTransport) -> None:
    ended = trio.Event()
    failures: list[BaseException] = []

    async def flood(stream: QuicStream) -> None:
        block = bytes(1024 * 1024)
        try:
            while True:
                await stream.send_all(block)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failures.append(exc)
        finally:
            ended.set()

    quick = EndpointConfig(handshake_timeout_s=2.0, idle_timeout_s=0.3)
    server, address = await make_transport(handler=flood, config=quick)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        stream = await lane.open_stream()
        await stream.send_all(b"go")  # then read nothing
        await ended.wait()
    assert "read nothing" in str(failures[0]) or "nothing heard" in str(failures[0])
    lane.close()
    assert await join(lane)


async def test_stopping_the_transport_ends_every_lane_thread(nursery: trio.Nursery) -> None:
    release = trio.Event()
    serving = 0
    both_served = trio.Event()

    async def hold(stream: QuicStream) -> None:
        nonlocal serving
        serving += 1
        if serving == 2:
            both_served.set()
        await release.wait()

    server = TcpTransport(Identity.generate(), FAST, stream_handler=hold)
    await nursery.start(server.run)
    address = await server.listen("127.0.0.1", 0)
    with trio.CancelScope() as client_scope:
        async with trio.open_nursery() as inner:
            client = TcpTransport(Identity.generate(), FAST)
            await inner.start(client.run)
            with trio.fail_after(LIMIT_S):
                lanes = [await lane_to(client, server, address) for _ in range(2)]
                await both_served.wait()
            assert len(server.lanes()) == 2
            client_scope.cancel()
    for lane in lanes:
        assert lane.is_closed
        assert await join(lane)
    release.set()


async def test_a_node_over_the_outbound_lane_limit_gets_a_refusal(
    make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp_transport, "MAX_OUTBOUND_LANES", 1)
    server, address = await make_transport()
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        first = await lane_to(client, server, address)
        with pytest.raises(LaneRefusedError):
            await lane_to(client, server, address)
        first.close()
        second = await lane_to(client, server, address)  # a closed lane frees its place
        second.close()
    assert await join(first) and await join(second)


async def test_no_thread_for_a_lane_costs_a_refusal_and_no_descriptor(
    make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, address = await make_transport()
    client, _ = await make_transport()
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("lane "):
            raise RuntimeError("can't start new thread")  # what a process at its thread limit gets
        real_start(thread)

    descriptors = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(threading.Thread, "start", start)
    with trio.fail_after(LIMIT_S):
        with pytest.raises(LaneRefusedError, match=r"cannot run a lane|did not admit"):
            await lane_to(client, server, address)
        await trio.testing.wait_all_tasks_blocked()  # the server's side gave up too
    # Sockets and pipes closed (at most as many as before: an earlier test's lane thread may
    # close its own while this one runs).
    assert len(os.listdir("/proc/self/fd")) <= descriptors
    assert client.lanes() == [] and server.lanes() == []
    monkeypatch.setattr(threading.Thread, "start", real_start)
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)  # both still serve lanes
        lane.close()
        assert await join(lane)


async def admitted_raw_lane(address: tuple[str, int]) -> tuple[trio.SocketStream, TlsChannel]:
    """A hand-driven lane client past the admission byte."""
    tcp = await trio.open_tcp_stream(*address)
    channel = TlsChannel(Identity.generate(), is_client=True, alpn=ALPN_LANE_PROTOCOL)
    await tls_handshake(tcp, channel)
    admitted = b""
    while not admitted:
        admitted = channel.receive_data(await tcp.receive_some())
    assert admitted == LANE_ACCEPTED
    return tcp, channel


async def test_a_reset_after_close_notify_ends_a_lane_that_neither_reads_nor_sends(
    make_transport: MakeTransport,
) -> None:
    # Review finding: poll reports a reset whatever the mask asks for, and a thread with
    # nothing to read (close_notify came) or send spun at 100% until the handler closed.
    release = trio.Event()
    got_eof = trio.Event()

    async def busy_elsewhere(stream: QuicStream) -> None:
        assert await read_all(stream) == b"x"  # up to the close_notify
        got_eof.set()
        await release.wait()  # holds the stream without reading or sending

    server, address = await make_transport(handler=busy_elsewhere)
    with trio.fail_after(LIMIT_S):
        tcp, channel = await admitted_raw_lane(address)
        channel.send(b"x")
        channel.close()
        await tcp.send_all(channel.data_to_send())
        await got_eof.wait()
        (lane,) = server.lanes()
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await tcp.aclose()  # a reset
        await lane.wait_closed()
    assert lane.close_initiator == "network" and "connection lost" in str(lane.close_reason)
    release.set()
    assert await join(lane)


def test_a_lane_waits_without_a_deadline_once_nothing_is_expected() -> None:
    # Review finding: after close_notify the idle deadline stayed in the past and the thread
    # polled every millisecond; only deadlines that apply count.
    assert lane_wait_deadline(idle_timeout_s=60, last_received=None, send_progress_at=None, drain_until=None) is None
    assert lane_wait_deadline(idle_timeout_s=60, last_received=5.0, send_progress_at=None, drain_until=None) == 65.0
    assert lane_wait_deadline(idle_timeout_s=60, last_received=None, send_progress_at=7.0, drain_until=None) == 67.0
    assert lane_wait_deadline(idle_timeout_s=60, last_received=5.0, send_progress_at=7.0, drain_until=9.0) == 9.0


async def test_a_closed_lane_keeps_none_of_its_buffers(make_transport: MakeTransport) -> None:
    # Review finding: a closed lane and its stream refer to each other, so they live until the
    # cyclic collector runs; what the lane buffered (its TLS session, queued output) must not.
    release = trio.Event()

    async def hold(stream: QuicStream) -> None:
        await release.wait()  # reads nothing: the client's output waits

    server, address = await make_transport(handler=hold)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lane = await lane_to(client, server, address)
        assert lane._channel is not None
        channel = weakref.ref(lane._channel)
        stream = await lane.open_stream()
        await stream.send_all(bytes(512 * 1024))
        await stream.aclose()
        assert await join(lane)
    await trio.lowlevel.checkpoint()
    assert channel() is None and lane._outbox_bytes == 0
    release.set()


async def test_a_closed_framed_lane_drops_the_frame_it_was_filling(make_transport: MakeTransport) -> None:
    # A frame in progress is memory the peer announced (up to 2 MiB): it must not live on with
    # the closed lane until the cyclic collector runs.
    release = trio.Event()

    async def announce_and_stall(stream: QuicStream) -> None:
        # One write, one TLS record: a whole small frame, then 1 MiB announced and 1000 bytes.
        await stream.send_all(b"\0\0\0\1x" + (1 << 20).to_bytes(4, "big") + bytes(1000))
        await release.wait()

    server, address = await make_transport(handler=announce_and_stall)
    client, _ = await make_transport()
    with trio.fail_after(LIMIT_S):
        lane = await client.open_lane(PeerAddr(address, server.peer_id), framed_receive=True)
        stream = await lane.open_stream()
        await stream.send_all(b"x")  # the server's handler starts on the first byte
        # Decrypted with the big frame's start: that frame is in progress now.
        assert await stream.receive_buffer() == b"\0\0\0\1x"
        await stream.aclose()
        assert await join(lane)
    assert lane._frames is None
    release.set()


async def test_one_source_address_holds_at_most_its_share_of_lanes(make_transport: MakeTransport) -> None:
    release = trio.Event()

    async def hold(stream: QuicStream) -> None:
        await release.wait()

    server, address = await make_transport(handler=hold)
    clients = [(await make_transport())[0] for _ in range(3)]
    with trio.fail_after(LIMIT_S):
        lanes = [await lane_to(c, server, address) for c in clients[:2] for _ in range(MAX_INBOUND_LANES_PER_PEER)]
        assert len(lanes) == MAX_INBOUND_LANES_PER_IP  # two ids fill 127.0.0.1's share
        with pytest.raises(LaneRefusedError):
            await lane_to(clients[2], server, address)  # a third, fresh id gets none
    release.set()
    for lane in lanes:
        lane.close()
        assert await join(lane)


async def test_a_server_that_cannot_run_a_lane_refuses_it_before_admitting_it(
    make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review finding: the admission byte went out before the server had the lane's pipe and
    # thread, so the client took a lane that then broke, instead of falling back to yamux.
    server, address = await make_transport()
    client, _ = await make_transport()
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == f"lane {client.peer_id.short()}":  # the server's side of the lane
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with trio.fail_after(LIMIT_S), pytest.raises(LaneRefusedError, match="did not admit"):
        await lane_to(client, server, address)
    assert server.lanes_admitted == 0 and client.lanes_opened == 0
