"""QUIC streams: integrity, half-close, resets, who-closed-it errors, backpressure, stream cap."""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from lattica.net import Connection, Endpoint, EndpointConfig, QuicStream
from lattica.net.config import STREAM_SEND_BUFFER_BYTES

from .conftest import MakeEndpoint


async def _pair(make_endpoint: MakeEndpoint, config: EndpointConfig | None = None) -> tuple[Connection, Connection]:
    """A connected (client side, server side) pair of connections."""
    server: Endpoint = await make_endpoint(config=config)
    client: Endpoint = await make_endpoint(config=config)
    inbound: list[Connection] = []
    server.set_connection_handler(inbound.append)
    conn = await client.connect(server.local_address, expected_peer=server.peer_id)
    # The server authenticates on the client's Finished, which precedes any stream data.
    stream = await conn.open_stream()
    await stream.send_all(b"!")
    await stream.send_eof()
    (server_side,) = inbound
    first = await server_side.accept_stream()
    assert await first.receive_some() == b"!"
    await first.aclose()
    await stream.aclose()
    return conn, server_side


async def _read_all(stream: QuicStream) -> bytes:
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)


async def test_stream_echoes_several_mib_intact(make_endpoint: MakeEndpoint) -> None:
    client, server = await _pair(make_endpoint)
    payload = hashlib.shake_256(b"seed").digest(5 * 1024 * 1024 + 123)

    async def echo() -> None:
        stream = await server.accept_stream()
        while data := await stream.receive_some(100_000):
            await stream.send_all(data)
        await stream.send_eof()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        stream = await client.open_stream()
        received = []

        async def reader() -> None:
            received.append(await _read_all(stream))

        nursery.start_soon(reader)
        for offset in range(0, len(payload), 300_000):
            await stream.send_all(payload[offset : offset + 300_000])
        await stream.send_eof()
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
    assert len(received[0]) == len(payload)


async def test_send_eof_makes_the_peer_read_empty_bytes_and_keeps_the_other_direction(
    make_endpoint: MakeEndpoint,
) -> None:
    client, server = await _pair(make_endpoint)
    stream = await client.open_stream()
    await stream.send_all(b"request")
    await stream.send_eof()
    await stream.send_eof()  # idempotent
    served = await server.accept_stream()
    assert await _read_all(served) == b"request"
    assert await served.receive_some() == b""  # EOF stays EOF
    await served.send_all(b"response")
    await served.send_eof()
    assert await _read_all(stream) == b"response"
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"after eof")


async def test_peer_reset_raises_broken_resource_error(make_endpoint: MakeEndpoint) -> None:
    client, server = await _pair(make_endpoint)
    stream = await client.open_stream()
    await stream.send_all(b"hello")
    served = await server.accept_stream()
    assert await served.receive_some() == b"hello"
    await served.aclose()  # not finished: resets its side and stops ours
    with pytest.raises(trio.BrokenResourceError, match="reset"):
        await stream.receive_some()


async def test_peer_stop_sending_makes_send_all_raise_broken_resource_error(
    make_endpoint: MakeEndpoint,
) -> None:
    client, server = await _pair(make_endpoint)
    stream = await client.open_stream()
    await stream.send_all(b"hello")
    served = await server.accept_stream()
    assert await served.receive_some() == b"hello"
    await served.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some()  # the reset arrives with the STOP_SENDING
    with pytest.raises(trio.BrokenResourceError, match="stopped reading"):
        await stream.send_all(b"more")


async def test_operations_on_a_stream_we_closed_raise_closed_resource_error(
    make_endpoint: MakeEndpoint,
) -> None:
    client, _server = await _pair(make_endpoint)
    stream = await client.open_stream()
    await stream.aclose()
    await stream.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_eof()


async def test_closing_our_connection_makes_its_streams_raise_closed_resource_error(
    make_endpoint: MakeEndpoint,
) -> None:
    client, _server = await _pair(make_endpoint)
    stream = await client.open_stream()
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await client.open_stream()


async def test_stalled_reader_blocks_the_writer_after_a_bounded_amount(
    make_endpoint: MakeEndpoint,
) -> None:
    window = 128 * 1024
    client, server = await _pair(make_endpoint, EndpointConfig(stream_receive_window_bytes=window))
    total = 4 * 1024 * 1024
    chunk = 32 * 1024
    payload = hashlib.shake_256(b"backpressure").digest(total)
    bound = window + STREAM_SEND_BUFFER_BYTES + chunk
    progress = {"sent": 0, "read": 0, "max_ahead": 0}
    writer_done = trio.Event()
    reader_go = trio.Event()
    received = bytearray()

    async def writer() -> None:
        stream = await client.open_stream()
        for offset in range(0, total, chunk):
            await stream.send_all(payload[offset : offset + chunk])
            progress["sent"] = offset + chunk
            ahead = progress["sent"] - progress["read"]
            progress["max_ahead"] = max(progress["max_ahead"], ahead)
        await stream.send_eof()
        writer_done.set()

    async def reader() -> None:
        stream = await server.accept_stream()
        await reader_go.wait()
        while data := await stream.receive_some():
            received.extend(data)
            progress["read"] = len(received)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        # Everyone is blocked and the reader has read nothing: the writer is stuck.
        assert not writer_done.is_set()
        assert 0 < progress["sent"] <= bound
        reader_go.set()
        await writer_done.wait()
    assert bytes(received) == payload
    assert progress["max_ahead"] <= bound


async def test_open_stream_waits_while_the_peer_stream_cap_is_reached(
    make_endpoint: MakeEndpoint,
) -> None:
    client, server = await _pair(make_endpoint, EndpointConfig(max_incoming_streams=4))
    streams = []
    for _ in range(3):  # _pair used one stream already and it was closed: 4 are free again
        stream = await client.open_stream()
        await stream.send_all(b"x")
        streams.append(stream)
    fourth = await client.open_stream()
    await fourth.send_all(b"x")
    streams.append(fourth)
    opened: list[QuicStream] = []

    async def open_fifth() -> None:
        opened.append(await client.open_stream())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_fifth)
        await trio.testing.wait_all_tasks_blocked()
        assert opened == []
        served = await server.accept_stream()
        assert await served.receive_some() == b"x"
        await served.send_eof()
        await streams[0].send_eof()
        assert await streams[0].receive_some() == b""
        await served.aclose()
        await streams[0].aclose()
    assert len(opened) == 1
