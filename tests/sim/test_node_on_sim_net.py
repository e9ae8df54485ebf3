"""The real ``Node`` on sim_net, in virtual time: connect, ping, RPC, identity checks, backpressure."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.errors import PeerIdMismatchError
from lattica.identity import Identity, PeerId
from lattica.net import QuicStream
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Host, LinkConfig, Network

PORT = 4001
ECHO = "/test/echo/1"
# Two access links per path: 25 ms each way gives 50 ms one-way latency; 5.13% loss on each
# gives 1 - 0.9487**2 = 10% loss per path and direction.
LOSSY_ACCESS = LinkConfig(latency_s=0.025, loss=0.0513)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"sim-node-%d" % i).digest())


@asynccontextmanager
async def started_nodes(hosts: Sequence[Host], config: NodeConfig | None = None) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes = []
        for i, host in enumerate(hosts):
            node = await stack.enter_async_context(Node(identity(i), host.bind(PORT), config or NodeConfig()))

            async def echo(peer: PeerId, payload: bytes) -> bytes:
                return payload[::-1]

            node.rpc.add_handler(ECHO, echo)
            nodes.append(node)
        yield nodes


def addr(node: Node) -> PeerAddr:
    return PeerAddr(node.listen_addresses()[0], node.peer_id)


async def test_two_nodes_connect_ping_and_echo_under_loss_and_latency(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=1) as net:
        hosts = [net.add_host(f"198.51.100.{i + 1}", LOSSY_ACCESS) for i in range(2)]
        async with started_nodes(hosts) as (a, b):
            connection = await a.connect(addr(b))
            assert connection.peer_id == b.peer_id
            rtts = [(await a.ping(b.peer_id)).rtt_s for _ in range(10)]
            # Each round trip crosses four 25 ms links; loss only ever adds retransmission time.
            assert min(rtts) >= 0.1 - 1e-9
            for size in (0, 1, 1000, 50_000):
                payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                assert await a.rpc.request(b.peer_id, ECHO, payload, timeout_s=30) == payload[::-1]
            # Both sides see one connection to each other, with opposite directions.
            assert [(c.peer_id, c.direction) for c in a.connections.connections()] == [(b.peer_id, "outbound")]
            assert [(c.peer_id, c.direction) for c in b.connections.connections()] == [(a.peer_id, "inbound")]
        assert net.counters().dropped["loss"] > 0  # the loss really happened


async def test_twenty_nodes_all_pairs_ping_and_echo(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=2) as net:
        hosts = [net.add_host(f"198.51.100.{i + 1}", LOSSY_ACCESS) for i in range(20)]
        async with started_nodes(hosts) as nodes:
            results: dict[tuple[int, int], bytes] = {}

            async def exchange(i: int, j: int) -> None:
                await nodes[i].connect(addr(nodes[j]))
                assert (await nodes[i].ping(nodes[j].peer_id)).rtt_s >= 0.1 - 1e-9
                results[(i, j)] = await nodes[i].rpc.request(nodes[j].peer_id, ECHO, b"%d->%d" % (i, j), timeout_s=60)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    for j in range(i + 1, 20):
                        nursery.start_soon(exchange, i, j)
            assert len(results) == 190
            assert all(reply == (b"%d->%d" % key)[::-1] for key, reply in results.items())
            # One connection per pair, reused: every node sees the other 19 exactly once.
            for node in nodes:
                peers = [c.peer_id for c in node.connections.connections()]
                assert len(peers) == len(set(peers)) == 19


async def test_dialling_the_wrong_peer_id_is_rejected(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=3) as net:
        hosts = [net.add_host(f"198.51.100.{i + 1}", LinkConfig(latency_s=0.01)) for i in range(2)]
        async with started_nodes(hosts) as (a, b):
            impostor = identity(99).peer_id
            with pytest.raises(PeerIdMismatchError) as info:
                await a.connect(PeerAddr(b.listen_addresses()[0], impostor))
            assert str(b.peer_id) in str(info.value)
            assert a.connections.connection(impostor) is None
            # The honest dial still works afterwards.
            assert (await a.connect(addr(b))).peer_id == b.peer_id


async def test_stalled_reader_bounds_what_the_writer_can_buffer(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=4) as net:
        hosts = [net.add_host(f"198.51.100.{i + 1}", LinkConfig(latency_s=0.01)) for i in range(2)]
        async with started_nodes(hosts) as (a, b):
            reader_may_go = trio.Event()
            received = bytearray()
            done = trio.Event()

            async def slow_sink(stream: QuicStream, peer: PeerId) -> None:
                await reader_may_go.wait()
                while data := await stream.receive_some():
                    received.extend(data)
                done.set()

            b.rpc.add_stream_handler("/test/sink/1", slow_sink)
            stream = await a.rpc.open_stream(addr(b), "/test/sink/1")
            chunk = bytes(64 * 1024)
            accepted = 0
            extra_chunks_after_release = 0

            async def writer() -> None:
                nonlocal accepted, extra_chunks_after_release
                while not reader_may_go.is_set():
                    await stream.send_all(chunk)
                    accepted += len(chunk)
                for _ in range(4):
                    await stream.send_all(chunk)
                    accepted += len(chunk)
                    extra_chunks_after_release += 1
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                # Virtual time is the behaviour here: with nobody reading, the writer stalls
                # once flow control and the send buffer are full, and stays stalled.
                await trio.sleep(30)
                stalled_at = accepted
                await trio.sleep(30)
                assert accepted == stalled_at
                bound = a.endpoint.config.stream_receive_window_bytes + 2 * 1024 * 1024
                assert 0 < stalled_at <= bound, stalled_at
                reader_may_go.set()
                await done.wait()
            assert extra_chunks_after_release == 4
            assert len(received) == accepted


async def test_first_request_to_a_new_peer_takes_two_round_trips(autojump_clock: trio.testing.MockClock) -> None:
    # One round trip for the handshake (the server's identity is proven by then), one for the
    # request, which leaves with the client's Finished.
    async with Network(seed=5) as net:
        hosts = [net.add_host(f"198.51.100.{i + 1}", LinkConfig(latency_s=0.025)) for i in range(2)]
        async with started_nodes(hosts) as (a, b):
            rtt = 0.1
            began = trio.current_time()
            assert await a.rpc.request(addr(b), ECHO, b"hello") == b"olleh"
            assert trio.current_time() - began == pytest.approx(2 * rtt, abs=0.005)
            began = trio.current_time()
            assert await a.rpc.request(b.peer_id, ECHO, b"again") == b"niaga"
            assert trio.current_time() - began == pytest.approx(rtt, abs=0.005)
