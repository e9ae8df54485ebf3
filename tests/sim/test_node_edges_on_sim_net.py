"""Node-level edges on sim_net, in virtual time: a restarted peer, explicit addresses, ourselves."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.control.messages import NoParams
from lattica.control.node_methods import register_node_methods
from lattica.control.registry import MethodRegistry
from lattica.errors import ConnectError, DialSelfError, RpcError
from lattica.identity import Identity, PeerId
from lattica.net.address import PeerAddr
from lattica.net.connection import Connection
from lattica.net.rpc import PING_PROTOCOL
from lattica.net.stateless_reset import build_stateless_reset
from lattica.node import Node
from sim_net import Host, LinkConfig, Network

PORT = 4001
ACCESS = LinkConfig(latency_s=0.025)  # two access links per path: 0.1 s round trip
RTT_S = 0.1
REQUEST_TIMEOUT_S = 10.0


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"edges-node-%d" % i).digest())


def addr(node: Node) -> PeerAddr:
    return PeerAddr(node.listen_addresses()[0], node.peer_id)


@asynccontextmanager
async def _after_a_crash(seed: int, *, b_dials: bool = False) -> AsyncIterator[tuple[Node, Host]]:
    """Node a, a moment after node b crashed (its socket went first, so not even a
    CONNECTION_CLOSE left) while they shared a connection that a dialled (``b_dials``: b did,
    and a used it); yields a and b's host, where a node may start again at b's address."""
    async with Network(seed=seed) as net:
        a_host, b_host = net.add_host("198.51.100.1", ACCESS), net.add_host("198.51.100.2", ACCESS)
        async with Node(identity(0), a_host.bind(PORT), NodeConfig()) as a:
            async with Node(identity(1), b_host.bind(PORT), NodeConfig()) as b:
                if b_dials:
                    await b.ping(addr(a))  # b dials: a is the server of this connection
                    await a.ping(b.peer_id)  # and uses it
                else:
                    await a.ping(addr(b))
                b.socket.close()
            # A restart takes a moment; packets b sent before it died have arrived by then.
            await trio.sleep(1.0)
            yield a, b_host


async def test_a_peer_restarted_at_the_same_address_resets_the_old_connection_within_a_round_trip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _after_a_crash(11) as (a, b_host):
        old = a.connections.connection(identity(1).peer_id)
        assert old is not None  # a cannot know
        async with Node(identity(1), b_host.bind(PORT), NodeConfig()) as restarted:
            first_request_at = trio.current_time()
            # The restarted node answers the old connection's packet with a Stateless Reset
            # (RFC 9000 section 10.3): its token, derived from the same identity, proves it.
            # The request goes once more on a fresh dial, within its timeout.
            reply = await a.rpc.request(restarted.peer_id, PING_PROTOCOL, b"hello", timeout_s=REQUEST_TIMEOUT_S)
            assert reply == b"hello"
            assert old is not None and old.is_closed and old.reset_by_peer
            assert a.connections.connection(restarted.peer_id) is not old
            # The reset (1 RTT), then a handshake and the echo (2 RTT): no request timeout.
            assert trio.current_time() - first_request_at == pytest.approx(3 * RTT_S, abs=0.01)
            # One reset for the dead connection's packets in flight (one per second to any
            # one address); it ended it, and nothing was answered back (no ping-pong).
            assert restarted.endpoint.stats.stateless_resets_sent == 1
            assert a.endpoint.stats.stateless_resets_received == 1
            assert a.endpoint.stats.stateless_resets_sent == 0
            # An operator sees the counters in `lattica status --json`.
            registry = MethodRegistry()
            register_node_methods(registry, restarted)
            status = registry.get("status")
            assert status is not None
            quic = (await status.handler(NoParams())).quic  # type: ignore[attr-defined]
            assert quic["stateless_resets_sent"] == 1 and quic["stateless_resets_limited"] >= 0


async def test_ping_right_after_a_peer_restarted_answers_over_a_fresh_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: `lattica ping PEERID` failed once ("stateless reset") right after the
    # peer's restart, though the reset proves the peer is there; the next ping worked.
    async with (
        _after_a_crash(17) as (a, b_host),
        Node(identity(1), b_host.bind(PORT), NodeConfig()) as restarted,
    ):
        began = trio.current_time()
        result = await a.ping(restarted.peer_id, timeout_s=REQUEST_TIMEOUT_S)
        assert result.peer_id == restarted.peer_id
        assert not result.reused_connection  # the reset one was given up
        assert trio.current_time() - began == pytest.approx(3 * RTT_S, abs=0.01)
        assert a.endpoint.stats.stateless_resets_received == 1


async def test_a_peer_that_dialled_us_and_restarted_resets_the_old_connection_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The id a client uses first carries no token (RFC 9000 section 10.3): the server moves to
    # one the client issued since, so the other direction recovers as fast.
    async with (
        _after_a_crash(15, b_dials=True) as (a, b_host),
        Node(identity(1), b_host.bind(PORT), NodeConfig()) as restarted,
    ):
        first_request_at = trio.current_time()
        # a never learnt an address of b to dial: the reset is the answer, at once.
        with pytest.raises(RpcError, match="stateless reset"):
            await a.rpc.request(restarted.peer_id, PING_PROTOCOL, b"hello", timeout_s=REQUEST_TIMEOUT_S)
        assert trio.current_time() - first_request_at == pytest.approx(RTT_S, abs=0.01)
        assert a.endpoint.stats.stateless_resets_received == 1


async def test_a_reset_counts_only_from_where_the_connection_sends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: a reset was taken from any address, so one who learnt a token (a second
    # daemon started with the same key file answers for the first) could end the connection
    # from anywhere; now it must come from the peer's address (RFC 9000 section 10.3.1).
    async with Network(seed=16) as net:
        a_host, b_host = net.add_host("198.51.100.1", ACCESS), net.add_host("198.51.100.2", ACCESS)
        c_host = net.add_host("198.51.100.3", ACCESS)
        async with Node(identity(0), a_host.bind(PORT)) as a, Node(identity(1), b_host.bind(PORT)) as b:
            await a.ping(addr(b))
            connection = a.connections.connection(b.peer_id)
            assert connection is not None and isinstance(connection, Connection)
            token = connection.peer_reset_token
            assert token is not None
            reset = build_stateless_reset(token, 100)
            assert reset is not None
            forger = c_host.bind(PORT)
            await forger.send_to(reset, a.listen_addresses()[0])
            await trio.sleep(1.0)
            assert not connection.is_closed
            assert a.endpoint.stats.stateless_resets_received == 0
            await b.socket.send_to(reset, a.listen_addresses()[0])  # the same bytes from b's address
            await trio.sleep(1.0)
            assert connection.is_closed
            assert a.endpoint.stats.stateless_resets_received == 1
            forger.close()


async def test_a_restarted_peer_with_another_identity_cannot_reset_the_old_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Ids and tokens are the old identity's: a different node at the address does not answer
    # (the ids carry no tag of its own), a stranger's reset would carry no valid token, and the
    # old rule (a silent connection is closed after
    # a request timeout) still recovers.
    async with (
        _after_a_crash(14) as (a, b_host),
        Node(identity(2), b_host.bind(PORT), NodeConfig()) as other,
    ):
        with pytest.raises(RpcError, match="timeout"):
            await a.rpc.request(identity(1).peer_id, PING_PROTOCOL, b"hi", timeout_s=REQUEST_TIMEOUT_S)
        assert other.endpoint.stats.stateless_resets_sent == 0  # ids it never issued
        assert a.endpoint.stats.stateless_resets_received == 0
        assert a.connections.connection(identity(1).peer_id) is None  # closed as silent


async def test_a_live_but_slow_peer_keeps_its_connection_after_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The other side of the rule: the connection carried ACKs, so it is not silent.
    async with Network(seed=12) as net:
        a_host, b_host = net.add_host("198.51.100.1", ACCESS), net.add_host("198.51.100.2", ACCESS)
        async with Node(identity(0), a_host.bind(PORT)) as a, Node(identity(1), b_host.bind(PORT)) as b:

            async def slow(peer: PeerId, payload: bytes) -> bytes:
                await trio.sleep(2 * REQUEST_TIMEOUT_S)
                return payload

            b.rpc.add_handler("/test/slow/1", slow)
            connection = await a.connect(addr(b))
            with pytest.raises(RpcError, match="timeout"):
                await a.rpc.request(b.peer_id, "/test/slow/1", b"x", timeout_s=REQUEST_TIMEOUT_S)
            assert not connection.is_closed
            assert (await a.ping(b.peer_id)).reused_connection


async def test_ping_dials_an_explicit_address_even_when_connected_to_that_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=13) as net:
        a_host, b_host = net.add_host("198.51.100.1", ACCESS), net.add_host("198.51.100.2", ACCESS)
        async with Node(identity(0), a_host.bind(PORT)) as a, Node(identity(1), b_host.bind(PORT)) as b:
            first = await a.ping(addr(b))
            assert (first.reused_connection, first.remote_address) == (False, ("198.51.100.2", PORT))
            assert first.rtt_s == pytest.approx(RTT_S, abs=0.005)  # the echo alone, not the dial
            again = await a.ping(addr(b))
            assert (again.reused_connection, again.remote_address) == (True, ("198.51.100.2", PORT))
            assert again.connect_s == 0
            # `lattica ping PEERID@HOST:4999` (nothing listens there) used to answer "pong" over
            # the existing connection.
            with pytest.raises(ConnectError):
                await a.ping(PeerAddr(("198.51.100.2", 4999), b.peer_id), timeout_s=5)
            # An IPv4-only node asked for an IPv6 address says so at once.
            began = trio.current_time()
            with pytest.raises(ConnectError, match="IPv4-only"):
                await a.ping(PeerAddr(("::1", PORT), b.peer_id))
            assert trio.current_time() == began


async def test_a_node_never_pings_or_connects_to_itself(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=14) as net:
        host = net.add_host("198.51.100.1", ACCESS)
        async with Node(identity(0), host.bind(PORT)) as a:
            with pytest.raises(DialSelfError):
                await a.ping(addr(a))
            with pytest.raises(DialSelfError):
                await a.ping(PeerAddr(a.listen_addresses()[0]))  # learnt only in the handshake
            with pytest.raises(RpcError, match="connect-failed") as info:
                await a.rpc.request(PeerAddr(a.listen_addresses()[0]), PING_PROTOCOL, b"x")
            assert isinstance(info.value.__cause__, DialSelfError)
            assert a.connections.connections() == []


async def test_a_peer_is_remembered_at_the_address_it_connects_from_not_the_one_it_claims(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding F5: the routing table kept the address a peer claimed in its sender info,
    # so a peer could make us hand out (and dial) an address it does not own.
    claimed = "203.0.113.99"  # nobody there
    async with Network(seed=12) as net:
        a_host, b_host = net.add_host("198.51.100.1", ACCESS), net.add_host("198.51.100.2", ACCESS)
        async with Node(identity(0), a_host.bind(PORT), NodeConfig()) as a:
            liar = Node(identity(1), b_host.bind(PORT), NodeConfig(), advertise_hosts=[claimed])
            async with liar:
                assert liar.listen_addresses() == [(claimed, PORT)]
                await liar.dht.bootstrap([addr(a)])
                (entry,) = [e for e in a.dht.routing_table_snapshot() if e.peer_id == liar.peer_id]
                assert entry.addresses == [("198.51.100.2", PORT)]
                assert (claimed, PORT) not in a.connections.addresses(liar.peer_id)
