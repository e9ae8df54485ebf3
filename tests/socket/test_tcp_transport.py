"""TLS 1.3-over-TCP transport on 127.0.0.1: mutual authentication, identity checks, a relaying
man in the middle, hostile peers, streams and RPC over it."""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.control.messages import NoParams
from lattica.control.node_methods import register_node_methods
from lattica.control.registry import MethodRegistry
from lattica.errors import ConnectRefusedError, DialSelfError, PeerIdMismatchError, RpcError
from lattica.identity import Identity, PeerId
from lattica.net import ConnectionManager, EndpointConfig, Rpc, UdpSocket, tcp_transport
from lattica.net.address import PeerAddr
from lattica.net.config import NetConfig
from lattica.net.datagram import Address
from lattica.net.stream import QuicStream
from lattica.net.tcp_connection import (
    MAX_CONTROL_BACKLOG_BYTES,
    RECEIVE_BYTES,
    TcpConnection,
    tls_handshake,
)
from lattica.net.tcp_transport import MAX_CONCURRENT_HANDSHAKES, MAX_HANDSHAKES_PER_IP
from lattica.net.tls_channel import TlsChannel
from lattica.net.yamux import FLAG_ACK, FLAG_SYN, TYPE_DATA, TYPE_PING, TYPE_WINDOW_UPDATE, encode_header
from lattica.node import Node
from tests.socket.conftest import MakeTransport, MakeUdpEndpoint, echo


async def exchange(connection: TcpConnection, payload: bytes) -> bytes:
    stream = await connection.open_stream()
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        parts = []
        while data := await stream.receive_some():
            parts.append(data)
        return b"".join(parts)


async def test_mutual_authentication_both_sides_know_who_they_talk_to(
    make_transport: MakeTransport,
) -> None:
    seen: list[PeerId] = []

    async def who(stream: QuicStream) -> None:
        seen.append(stream.connection.peer_id)
        await echo(stream)

    server, address = await make_transport(handler=who)
    client, _ = await make_transport()
    connection = await client.connect(PeerAddr(address, server.peer_id))
    assert connection.peer_id == server.peer_id
    assert await exchange(connection, b"hi") == b"hi"
    assert seen == [client.peer_id]
    assert [c.peer_id for c in server.connections()] == [client.peer_id]


async def test_a_connection_to_the_same_peer_is_reused(make_transport: MakeTransport) -> None:
    server, address = await make_transport()
    client, _ = await make_transport()
    first = await client.connect(PeerAddr(address, server.peer_id))
    assert await client.connect(PeerAddr(address, server.peer_id)) is first


async def test_a_peer_proving_another_id_is_refused_and_closed(
    make_transport: MakeTransport,
) -> None:
    server, address = await make_transport()
    client, _ = await make_transport()
    expected = Identity.generate().peer_id
    with pytest.raises(PeerIdMismatchError, match=str(server.peer_id)):
        await client.connect(PeerAddr(address, expected))
    assert client.connections() == []


async def test_dialling_ourselves_is_refused(make_transport: MakeTransport) -> None:
    node, address = await make_transport()
    with pytest.raises(DialSelfError):
        await node.connect(PeerAddr(address, node.peer_id))
    with pytest.raises(DialSelfError):
        await node.connect(PeerAddr(address))


async def test_a_client_without_a_certificate_is_refused(make_transport: MakeTransport) -> None:
    ran: list[QuicStream] = []

    async def record(stream: QuicStream) -> None:
        ran.append(stream)

    server, address = await make_transport(handler=record)
    tcp = await trio.open_tcp_stream(*address)
    channel = TlsChannel(Identity.generate(), is_client=True, present_certificate=False)
    with trio.fail_after(10):
        await tls_handshake(tcp, channel)  # TLS 1.3: the client finishes before the server checks
        closed_by_server = False
        while not closed_by_server:
            data = await tcp.receive_some(65536)
            try:
                channel.receive_data(data)
            except Exception:  # the server's alert
                closed_by_server = True
            closed_by_server = closed_by_server or not data
    await tcp.aclose()
    assert server.connections() == []
    assert ran == []


async def _relay(listener: trio.SocketListener, target: Address, seen: list[bytes]) -> None:
    """A man in the middle that forwards bytes both ways and records them."""
    downstream = await listener.accept()
    upstream = await trio.open_tcp_stream(*target)

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                seen.append(data)
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe, downstream, upstream)
        nursery.start_soon(pipe, upstream, downstream)


async def test_a_relaying_man_in_the_middle_sees_only_ciphertext(
    make_transport: MakeTransport, nursery: trio.Nursery
) -> None:
    server, address = await make_transport()
    client, _ = await make_transport()
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    seen: list[bytes] = []
    nursery.start_soon(_relay, listener, address, seen)
    relay_address = listener.socket.getsockname()[:2]
    connection = await client.connect(PeerAddr(relay_address, server.peer_id))
    secret = b"secret model shard " * 100
    assert await exchange(connection, secret) == secret
    assert connection.peer_id == server.peer_id
    assert b"secret model shard" not in b"".join(seen)


async def test_a_man_in_the_middle_with_its_own_key_cannot_impersonate(
    make_transport: MakeTransport,
) -> None:
    genuine, _ = await make_transport()
    _impostor, impostor_address = await make_transport()
    client, _ = await make_transport()
    with pytest.raises(PeerIdMismatchError):
        await client.connect(PeerAddr(impostor_address, genuine.peer_id))
    assert client.connection(genuine.peer_id) is None


async def test_many_streams_carry_data_concurrently_with_flow_control(
    make_transport: MakeTransport,
) -> None:
    server, address = await make_transport()
    client, _ = await make_transport()
    connection = await client.connect(PeerAddr(address, server.peer_id))
    payloads = [bytes([i]) * (300_000 + i) for i in range(12)]  # each beyond one 256 KiB window
    replies: dict[int, bytes] = {}

    async def one(i: int) -> None:
        replies[i] = await exchange(connection, payloads[i])

    async with trio.open_nursery() as inner:
        for i in range(len(payloads)):
            inner.start_soon(one, i)
    assert [hashlib.sha256(replies[i]).digest() for i in range(12)] == [hashlib.sha256(p).digest() for p in payloads]
    assert connection.open_stream_count == 0


async def test_rpc_requests_run_over_a_tcp_connection(
    make_transport: MakeTransport, make_udp_endpoint: MakeUdpEndpoint
) -> None:
    async def rpc_for(identity: Identity) -> Rpc:
        return Rpc(ConnectionManager(await make_udp_endpoint(identity)))

    server_identity, client_identity = Identity.generate(), Identity.generate()
    server_rpc, client_rpc = await rpc_for(server_identity), await rpc_for(client_identity)
    callers: list[PeerId] = []

    async def shout(peer: PeerId, payload: bytes) -> bytes:
        callers.append(peer)
        return payload.upper()

    server_rpc.add_handler("/test/shout/1", shout)
    server, address = await make_transport(server_identity, handler=server_rpc.serve_stream)
    client, _ = await make_transport(client_identity, handler=client_rpc.serve_stream)
    connection = await client.connect(PeerAddr(address, server.peer_id))
    assert await client_rpc.request(connection, "/test/shout/1", b"hello") == b"HELLO"
    assert callers == [client_identity.peer_id]
    assert await client_rpc.ping(connection) >= 0
    with pytest.raises(RpcError, match="unknown-protocol"):
        await client_rpc.request(connection, "/test/missing/1", b"")
    assert server_rpc.manager.connections() == []  # nothing went over QUIC


# -- hostile peers ----------------------------------------------------------------------------


async def _authenticated_raw_peer(address: Address) -> tuple[trio.SocketStream, TlsChannel]:
    tcp = await trio.open_tcp_stream(*address)
    channel = TlsChannel(Identity.generate(), is_client=True)
    leftover = await tls_handshake(tcp, channel)
    assert leftover == b""
    return tcp, channel


async def _wait_until_closed(tcp: trio.SocketStream, channel: TlsChannel) -> None:
    with trio.fail_after(10):
        try:
            while data := await tcp.receive_some(65536):
                channel.receive_data(data)
                if channel.peer_closed:
                    return
        except trio.BrokenResourceError:
            return


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(
            encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + encode_header(TYPE_DATA, 0, 1, 256 * 1024 + 1),
            id="data-beyond-the-window",
        ),
        pytest.param(
            b"".join(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 2 * i + 1, 0) for i in range(5)),
            id="too-many-streams",
        ),
        pytest.param(b"\x07" * 12, id="garbage-frame"),
    ],
)
async def test_a_hostile_peer_is_disconnected_and_others_are_still_served(
    make_transport: MakeTransport, frames: bytes
) -> None:
    config = EndpointConfig(handshake_timeout_s=2.0, stream_receive_window_bytes=256 * 1024, max_incoming_streams=4)
    server, address = await make_transport(handler=None, config=config)
    tcp, channel = await _authenticated_raw_peer(address)
    channel.send(frames)
    await tcp.send_all(channel.data_to_send())
    await _wait_until_closed(tcp, channel)
    await tcp.aclose()
    honest, _ = await make_transport()
    connection = await honest.connect(PeerAddr(address, server.peer_id))
    assert connection.peer_id == server.peer_id


async def test_a_silent_tcp_client_is_dropped_after_the_handshake_timeout(
    make_transport: MakeTransport,
) -> None:
    config = EndpointConfig(handshake_timeout_s=0.2)
    _server, address = await make_transport(config=config)
    tcp = await trio.open_tcp_stream(*address)
    with trio.fail_after(10):
        assert await tcp.receive_some(100) == b""
    await tcp.aclose()


async def _idle_sockets_from(source_ip: str, address: Address, count: int) -> list[trio.socket.SocketType]:
    # On loopback every 127.x.y.z is ours: binding the source makes these a different IP.
    socks = []
    for _ in range(count):
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        await sock.bind((source_ip, 0))
        await sock.connect(address)
        socks.append(sock)
    return socks


async def test_idle_sockets_from_one_ip_do_not_stop_a_genuine_dial(make_transport: MakeTransport) -> None:
    server, address = await make_transport(config=EndpointConfig(handshake_timeout_s=10.0))
    idle = await _idle_sockets_from("127.0.0.2", address, MAX_CONCURRENT_HANDSHAKES + 6)
    try:
        client, _ = await make_transport()
        connection = await client.connect(PeerAddr(address, server.peer_id), timeout_s=5.0)
        assert connection.peer_id == server.peer_id
        # Those beyond the per-IP cap were closed at accept, not left waiting.
        assert server.refused_connections >= len(idle) - MAX_HANDSHAKES_PER_IP
    finally:
        for sock in idle:
            sock.close()


async def test_a_client_that_sends_no_tls_bytes_is_dropped_before_the_handshake_timeout(
    make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp_transport, "FIRST_BYTES_TIMEOUT_S", 0.2)
    _server, address = await make_transport(config=EndpointConfig(handshake_timeout_s=600.0))
    tcp = await trio.open_tcp_stream(*address)
    with trio.fail_after(10):  # a guard only: without the first-bytes limit this waits 600 s
        assert await tcp.receive_some(100) == b""
    await tcp.aclose()


async def test_dialling_a_closed_port_is_a_refusal(make_transport: MakeTransport) -> None:
    # A refusal (nothing listens) is told apart: the bulk path tries a restarted peer again.
    client, _ = await make_transport()
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    address = listener.socket.getsockname()[:2]
    await listener.aclose()
    with pytest.raises(ConnectRefusedError):
        await client.connect(PeerAddr(address, Identity.generate().peer_id))


async def test_a_stream_the_server_closes_unread_is_reset_for_the_client(
    make_transport: MakeTransport,
) -> None:
    hung_up: list[QuicStream] = []

    async def hang_up(stream: QuicStream) -> None:
        if hung_up:
            await echo(stream)
        hung_up.append(stream)

    server, address = await make_transport(handler=hang_up)
    client, _ = await make_transport()
    connection = await client.connect(PeerAddr(address, server.peer_id))
    stream = await connection.open_stream()
    await stream.send_all(b"are you there?")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="reset"):
        await stream.receive_some()
    await stream.aclose()
    assert await exchange(connection, b"still up") == b"still up"  # only the stream ended


async def test_a_node_listens_for_tcp_only_when_asked_and_serves_rpc_over_it() -> None:
    listening = NodeConfig(net=NetConfig(tcp_listen=True))
    async with (
        Node(Identity.generate(), UdpSocket.bind_with_tcp_port(), listening) as server,
        Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0)) as client,
    ):
        udp_port = server.socket.local_address[1]
        assert server.tcp.listen_addresses == [("127.0.0.1", udp_port)]
        assert client.tcp.listen_addresses == []
        connection = await client.tcp.connect(PeerAddr(("127.0.0.1", udp_port), server.peer_id))
        assert await client.rpc.ping(connection) >= 0
        assert client.connections.connections() == []  # the ping did not use QUIC
        # `lattica status` shows where TCP is accepted, and only where it is.
        for node, expected in ((server, [f"{server.peer_id}@127.0.0.1:{udp_port}"]), (client, [])):
            registry = MethodRegistry()
            register_node_methods(registry, node)
            status = registry.get("status")
            assert status is not None
            assert (await status.handler(NoParams())).tcp_listen_addrs == expected  # type: ignore[attr-defined]
        # A lane carries one RPC stream; `lattica peers` lists it while it is open.
        lane = await client.tcp.open_lane(PeerAddr(("127.0.0.1", udp_port), server.peer_id))
        registry = MethodRegistry()
        register_node_methods(registry, client)
        peers = registry.get("peers")
        assert peers is not None
        rows = await peers.handler(NoParams())
        assert [(r.peer_id, r.transport, r.direction) for r in rows] == [  # type: ignore[attr-defined]
            (str(server.peer_id), "tcp", "outbound"),
            (str(server.peer_id), "tcp-lane", "outbound"),
        ]
        assert await client.rpc.ping(lane) >= 0
        assert lane.is_closed  # with its one stream
        rows = await peers.handler(NoParams())
        assert [r.transport for r in rows] == ["tcp"]  # type: ignore[attr-defined]


async def test_frames_that_arrive_with_the_handshake_are_answered(
    make_transport: MakeTransport,
) -> None:
    """A client's Finished and first yamux ping often share one TCP segment; the server must
    still answer the ping (it once queued the answer with no writer awake to send it)."""
    _server, address = await make_transport()
    tcp = await trio.open_tcp_stream(*address)
    channel = TlsChannel(Identity.generate(), is_client=True)
    channel.start()
    with trio.fail_after(10):
        while not channel.handshake_complete:
            await tcp.send_all(channel.data_to_send())
            channel.receive_data(await tcp.receive_some(65536))
        channel.send(encode_header(TYPE_PING, FLAG_SYN, 0, 7))
        await tcp.send_all(channel.data_to_send())  # Finished and the ping, in one send
        answer = b""
        while len(answer) < 12:
            answer += channel.receive_data(await tcp.receive_some(65536))
    assert answer[:12] == encode_header(TYPE_PING, FLAG_ACK, 0, 7)
    await tcp.aclose()


async def test_a_peer_that_floods_pings_and_never_reads_stalls_only_itself(
    make_transport: MakeTransport,
) -> None:
    """Our answers pile up only to a bound, then we stop reading: the flood stops in the
    kernel's socket buffers, and our memory for this peer stays bounded."""
    server, address = await make_transport()
    tcp, channel = await _authenticated_raw_peer(address)
    pings = b"".join(encode_header(TYPE_PING, FLAG_SYN, 0, n) for n in range(5000))
    sent_batches = 0

    async def flood() -> None:
        nonlocal sent_batches
        while True:
            channel.send(pings)
            await tcp.send_all(channel.data_to_send())
            sent_batches += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        with trio.fail_after(10):
            # Every task blocked for 0.1 s: the server has bytes to read but does not read.
            await trio.testing.wait_all_tasks_blocked(0.1)
        (connection,) = server.connections()
        batches_when_stalled = sent_batches
        await trio.testing.wait_all_tasks_blocked(0.1)
        assert sent_batches == batches_when_stalled  # the flood is stuck in the socket
        queued = connection.queued_output_bytes
        assert MAX_CONTROL_BACKLOG_BYTES < queued <= MAX_CONTROL_BACKLOG_BYTES + RECEIVE_BYTES
        assert not connection.is_closed
        nursery.cancel_scope.cancel()
    await tcp.aclose()


async def test_bulk_path_uses_tcp_where_the_peer_accepts_it_and_quic_elsewhere() -> None:
    listening = NodeConfig(net=NetConfig(tcp_listen=True))
    async with (
        Node(Identity.generate(), UdpSocket.bind_with_tcp_port(), listening) as fast,
        Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0)) as quic_only,
        Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0)) as client,
    ):
        to_fast = await client.bulk.connection(PeerAddr(fast.socket.local_address, fast.peer_id))
        assert isinstance(to_fast, TcpConnection)
        assert to_fast.peer_id == fast.peer_id
        assert await client.bulk.connection(fast.peer_id) is to_fast  # reused
        assert await client.rpc.ping(to_fast) >= 0

        address = quic_only.socket.local_address
        to_quic = await client.bulk.connection(PeerAddr(address, quic_only.peer_id))
        assert not isinstance(to_quic, TcpConnection)
        assert to_quic.peer_id == quic_only.peer_id
        assert client.bulk.tcp_recently_failed(address)  # not tried again for a while
        assert await client.rpc.ping(to_quic) >= 0


async def test_bulk_path_tries_tcp_again_when_the_peer_comes_back_on_a_new_connection() -> None:
    # A seeder killed and restarted (its TCP refused while it was down) must get TCP again at
    # once, not after retry_after_s: its first QUIC connection is gone, the new one may have it.
    seeder_identity = Identity.generate()
    async with Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0)) as client:
        async with Node(seeder_identity, UdpSocket.bind_with_tcp_port()) as before:  # no TCP yet
            address = before.socket.local_address
            first = await client.bulk.connection(PeerAddr(address, before.peer_id))
            assert not isinstance(first, TcpConnection)
            assert client.bulk.tcp_recently_failed(address)
        with trio.fail_after(10):
            await first.wait_closed()
        listening = NodeConfig(net=NetConfig(tcp_listen=True))
        async with Node(seeder_identity, UdpSocket.bind(*address), listening):
            again = await client.bulk.connection(PeerAddr(address, seeder_identity.peer_id))
            assert isinstance(again, TcpConnection)
            assert not client.bulk.tcp_recently_failed(address)
