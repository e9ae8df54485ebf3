"""The TLS-over-TCP connection driver over in-memory streams, in virtual time (no sockets):
keepalive, idle timeout, idle close, and closing semantics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from lattica.identity import Identity
from lattica.net import tcp_connection, tls_channel
from lattica.net.tcp_connection import TcpConnection, tls_handshake
from lattica.net.tls_channel import TlsChannel
from lattica.net.yamux import FLAG_SYN, TYPE_PING, encode_header
from tests.unit.tls_records import RecordCrafter, client_recording_secrets

CLIENT = Identity.from_seed(b"1" * 32)
SERVER = Identity.from_seed(b"2" * 32)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def connected_pair(
    *, client_options: dict[str, float | None] | None = None, **options: float | None
) -> AsyncIterator[tuple[TcpConnection, TcpConnection, trio.Nursery]]:
    """Two connections over an in-memory byte stream pair, handshaken and running."""
    client_tcp, server_tcp = trio.testing.memory_stream_pair()
    client_channel = TlsChannel(CLIENT, is_client=True)
    server_channel = TlsChannel(SERVER, is_client=False)
    leftovers: dict[str, bytes] = {}

    async def handshake(name: str, tcp: trio.abc.Stream, channel: TlsChannel) -> None:
        leftovers[name] = await tls_handshake(tcp, channel)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake, "client", client_tcp, client_channel)
        nursery.start_soon(handshake, "server", server_tcp, server_channel)

    def make(tcp: trio.abc.Stream, channel: TlsChannel, name: str, extra: dict[str, float | None]) -> TcpConnection:
        return TcpConnection(
            tcp,
            channel,
            remote_address=("127.0.0.1", 1),
            received_with_handshake=leftovers[name],
            **{**options, **extra},  # type: ignore[arg-type]
        )

    client = make(client_tcp, client_channel, "client", client_options or {})
    server = make(server_tcp, server_channel, "server", {})
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        yield client, server, nursery
        nursery.cancel_scope.cancel()


async def test_keepalive_pings_keep_an_idle_connection_up(mock_clock: trio.testing.MockClock) -> None:
    async with connected_pair(keepalive_interval_s=5.0, idle_timeout_s=12.0) as (client, server, _):
        await client.wait_confirmed()
        await trio.sleep(100.0)
        assert not client.is_closed and not server.is_closed


async def test_a_silent_peer_is_dropped_after_the_idle_timeout(mock_clock: trio.testing.MockClock) -> None:
    # The server never pings (its keepalive is longer than the client's idle timeout).
    async with connected_pair(
        keepalive_interval_s=50.0,
        idle_timeout_s=100.0,
        client_options={"keepalive_interval_s": 1000.0, "idle_timeout_s": 10.0},
    ) as (client, _server, _):
        start = trio.current_time()
        await client.wait_closed()
        assert client.close_initiator == "network"
        assert trio.current_time() - start == pytest.approx(10.0)


async def test_a_connection_without_streams_is_closed_after_idle_close(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with connected_pair(keepalive_interval_s=5.0, idle_timeout_s=12.0, idle_close_s=30.0) as (
        client,
        server,
        _,
    ):
        stream = await client.open_stream()
        await trio.sleep(60.0)
        assert not client.is_closed  # a stream is open
        await stream.aclose()
        closed_at = trio.current_time()
        await client.wait_closed()
        assert client.close_initiator == "local"
        assert trio.current_time() - closed_at <= 30.0 + 5.0
        await server.wait_closed()
        assert server.close_initiator == "peer"


async def test_streams_of_a_connection_we_closed_raise_closed_and_the_peer_sees_broken(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with connected_pair() as (client, server, _):
        stream = await client.open_stream()
        await stream.send_all(b"x")
        peer_stream = await server.accept_stream()
        await client.aclose("done")
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"y")
        with pytest.raises(trio.BrokenResourceError):
            await peer_stream.receive_some()
            await peer_stream.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.accept_stream()


async def node_and_raw_peer(
    peer_tcp: Any, node_tcp: Any, peer_channel: TlsChannel, *, keepalive_interval_s: float, idle_timeout_s: float
) -> tuple[TcpConnection, TlsChannel]:
    """A server connection (and its TLS channel) handshaken with ``peer_channel``, a peer we drive by hand: after the
    handshake it reads our session tickets and then only what its test reads."""
    node_channel = TlsChannel(SERVER, is_client=False)
    leftover: list[bytes] = []

    async def node_handshake() -> None:
        leftover.append(await tls_handshake(node_tcp, node_channel))

    async def peer_handshake() -> None:
        await tls_handshake(peer_tcp, peer_channel)
        peer_channel.receive_data(await peer_tcp.receive_some())  # our session tickets

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_handshake)
        nursery.start_soon(node_handshake)
    node = TcpConnection(
        node_tcp, node_channel, remote_address=("127.0.0.1", 1), received_with_handshake=leftover[0],
        keepalive_interval_s=keepalive_interval_s, idle_timeout_s=idle_timeout_s,
    )
    return node, node_channel


@pytest.mark.parametrize("bio_length", [True, False], ids=["bio-length", "no-bio-length"])
async def test_a_peer_that_floods_key_update_requests_and_never_reads_stalls_only_itself(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, bio_length: bool
) -> None:
    # Each KeyUpdate(update_requested) makes OpenSSL queue one of ours. The peer never reads, so
    # they wait; the reader went on reading (the backlog check saw yamux's output, not TLS's)
    # and the queue grew ~1 MiB per MiB the peer sent, for as long as it sent (review finding).
    backlog = 64 * 1024
    monkeypatch.setattr(tcp_connection, "MAX_CONTROL_BACKLOG_BYTES", backlog)
    # The TLS channel refuses a KeyUpdate flood on its own now; lift that here, so what is
    # tested is the reader's bound on any output TLS queues by itself.
    monkeypatch.setattr(tls_channel, "_POST_HANDSHAKE_EVENTS", 10**9)
    if not bio_length:  # a pyOpenSSL without the handle to ask the BIO's length
        monkeypatch.setattr(tls_channel, "_mem_bio_length", lambda connection: None)
    peer_tcp, node_tcp = trio.testing.lockstep_stream_pair()  # a send waits for the other's read
    peer_channel, secrets = client_recording_secrets(CLIENT)
    node, node_channel = await node_and_raw_peer(
        peer_tcp, node_tcp, peer_channel, keepalive_interval_s=1000.0, idle_timeout_s=30.0
    )
    crafter = RecordCrafter(peer_channel, secrets)
    sent = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)

        async def flood() -> None:
            nonlocal sent
            for _ in range(40):  # 40 x 2,000 KeyUpdates: ~2 MiB of our answers, unbounded before
                await peer_tcp.send_all(b"".join(crafter.key_update(requested=True) for _ in range(2000)))
                sent += 2000

        nursery.start_soon(flood)
        await node.wait_closed()
        nursery.cancel_scope.cancel()
    assert node.close_initiator == "network"  # it stopped reading; then nothing was heard
    assert sent < 40 * 2000
    assert node_channel.pending_output_bytes <= backlog + 2 * tcp_connection.RECEIVE_BYTES


@pytest.mark.parametrize("reads", [False, True], ids=["reads-nothing", "reads-slowly"])
async def test_a_peer_that_keeps_sending_but_reads_nothing_is_closed(
    mock_clock: trio.testing.MockClock, reads: bool
) -> None:
    # A ping every 30 s kept "nothing heard" from ever firing while our writer sat in a send
    # forever (review finding: still open after 24 virtual hours). A slow reader stays.
    peer_tcp, node_tcp = trio.testing.lockstep_stream_pair()  # a send waits for the other's read
    peer_channel = TlsChannel(CLIENT, is_client=True)
    node, _ = await node_and_raw_peer(peer_tcp, node_tcp, peer_channel, keepalive_interval_s=15.0, idle_timeout_s=60.0)
    written = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)

        async def answer() -> None:  # the node sends 8 MiB on a stream
            nonlocal written
            stream = await node.open_stream()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for _ in range(64):
                    await stream.send_all(b"x" * 128 * 1024)
                    written += 128 * 1024

        async def peer() -> None:
            for n in range(1, 200):
                peer_channel.send(encode_header(TYPE_PING, FLAG_SYN, 0, n))
                await peer_tcp.send_all(peer_channel.data_to_send())
                # Reading: up to 256 KiB every 30 s (8.7 KB/s), slow but a slice a minute and
                # more; it never grants stream window, so there is soon nothing left to read.
                for _ in range(16 if reads else 0):
                    with trio.move_on_after(1.0):
                        await peer_tcp.receive_some(16 * 1024)
                await trio.sleep(30.0)

        nursery.start_soon(answer)
        nursery.start_soon(peer)
        with trio.move_on_after(3600.0):
            await node.wait_closed()
        closed_by_then = node.is_closed
        nursery.cancel_scope.cancel()
    if reads:
        assert not closed_by_then, node.close_reason
    else:
        assert node.close_reason == "the peer read nothing for 60 s"
        assert written < 8 * 1024 * 1024
