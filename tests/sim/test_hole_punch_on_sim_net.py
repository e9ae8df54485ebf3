"""Hole punching between real ``Node``s on sim_net, in virtual time: two nodes behind
port-restricted NATs reach each other through a public relay, then upgrade to a direct QUIC
connection; the relayed one is closed once idle, and new streams take the direct path."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.control.messages import NoParams
from lattica.control.nat_methods import register_nat_methods
from lattica.control.node_methods import register_node_methods
from lattica.control.registry import MethodRegistry
from lattica.identity import Identity, PeerId
from lattica.nat.config import NatConfig
from lattica.nat.hole_punch import PROTOCOL_ID, Connect, Sync
from lattica.nat.hole_punch_config import HolePunchConfig
from lattica.nat.hole_punch_service import encode_message_frame, receive_message_frame
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_config import RelayConfig
from lattica.nat.relay_messages import HOP_PROTOCOL
from lattica.nat.relay_record import RELAYED_ADDRESSES_KEY
from lattica.net.address import PeerAddr
from lattica.net.connection import Connection
from lattica.node import Node
from sim_net import Filtering, LinkConfig, Mapping, Network, PortAllocation
from sim_net import NatConfig as SimNatConfig

PORT = 4001
LINK = LinkConfig(latency_s=0.025)
NAT_LINK = LinkConfig(latency_s=0.005)
PORT_RESTRICTED = SimNatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)
SYMMETRIC = SimNatConfig(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"punch-node-%d" % i).digest())


def config(**relay: object) -> NodeConfig:
    return NodeConfig(nat=NatConfig(relay=RelayConfig(**relay)))  # type: ignore[arg-type]


@dataclass
class Scene:
    relay: Node
    a: Node
    b: Node

    def b_relayed(self) -> RelayedAddr:
        [address] = self.b.relay_client.relayed_addresses()
        return RelayedAddr.parse(address)


@asynccontextmanager
async def scene(*, seed: int, nat_a: SimNatConfig, nat_b: SimNatConfig) -> AsyncIterator[Scene]:
    """A public relay; a and b each behind its own NAT, b holding a reservation on the relay."""
    async with Network(seed=seed) as net, AsyncExitStack() as stack:
        relay_host = net.add_host("198.51.100.1", LINK)
        relay = await stack.enter_async_context(
            Node(identity(100), relay_host.bind(PORT), config(service=True), rng=random.Random(seed))
        )
        relay_string = f"{relay.peer_id}@198.51.100.1:{PORT}"
        nodes = []
        for i, (nat_ip, nat_config) in enumerate((("203.0.113.1", nat_a), ("203.0.113.2", nat_b))):
            host = net.add_nat(nat_ip, nat_config).add_host("192.168.1.10", NAT_LINK)
            settings = config(relays=(relay_string,), reservations=1)
            nodes.append(
                await stack.enter_async_context(
                    Node(identity(i), host.bind(PORT), settings, rng=random.Random(seed + i))
                )
            )
        yield Scene(relay, nodes[0], nodes[1])


async def wait_attempt_over(node: Node, peer: PeerId) -> None:
    while node.hole_punch.direct_after_s(peer) is None and (
        peer in node.hole_punch.active() or node.hole_punch.stats.attempts == 0
    ):
        await node.hole_punch.wait_changed()


async def test_two_port_restricted_nats_upgrade_a_relayed_connection_to_direct(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=31, nat_a=PORT_RESTRICTED, nat_b=PORT_RESTRICTED) as s:
        await s.a.relay_client.wait_reservations()
        await s.b.relay_client.wait_reservations()
        first = await s.a.ping(s.b_relayed(), timeout_s=10)
        assert first.relayed_via == s.relay.peer_id
        [relayed] = [c for c in s.a.connections.connections() if c.peer_id == s.b.peer_id]
        with trio.fail_after(60):
            await wait_attempt_over(s.b, s.a.peer_id)
        # b accepted the relayed connection, so b initiated; both ends see the direct path.
        direct_after_s = s.b.hole_punch.direct_after_s(s.a.peer_id)
        assert direct_after_s is not None and 0 < direct_after_s < 5
        assert s.b.hole_punch.stats.punches_sent > 0
        with trio.fail_after(10):
            while s.a.hole_punch.direct_after_s(s.b.peer_id) is None:
                await s.a.hole_punch.wait_changed()
        # New streams take the direct connection: a ping by peer id goes around the relay.
        result = await s.a.ping(s.b.peer_id, timeout_s=10)
        assert result.relayed_via is None
        assert result.remote_address == ("203.0.113.2", PORT)
        # The relayed connection is closed once idle, at both ends; the direct one stays.
        assert relayed.relayed_via == s.relay.peer_id
        with trio.fail_after(10):
            await relayed.wait_closed()
        [direct] = [c for c in s.b.connections.connections() if c.peer_id == s.a.peer_id]
        assert direct.relayed_via is None
        # The control API's peers rows say so, with the time it took.
        registry = MethodRegistry()
        register_node_methods(registry, s.b)
        peers = registry.get("peers")
        assert peers is not None
        rows = {row.peer_id: row for row in await peers.handler(NoParams())}  # type: ignore[attr-defined]
        assert rows[str(s.a.peer_id)].path == "direct"
        assert rows[str(s.a.peer_id)].direct_after_s == round(direct_after_s, 3)
        assert rows[str(s.relay.peer_id)].direct_after_s is None
        # nat.status counts it.
        register_nat_methods(registry, s.b)
        nat_status = registry.get("nat.status")
        assert nat_status is not None
        status = await nat_status.handler(NoParams())
        assert status.hole_punch is not None  # type: ignore[attr-defined]
        assert (status.hole_punch.attempts, status.hole_punch.succeeded, status.hole_punch.active) == (1, 1, 0)  # type: ignore[attr-defined]


async def test_symmetric_nat_on_one_side_keeps_the_relayed_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=32, nat_a=SYMMETRIC, nat_b=PORT_RESTRICTED) as s:
        await s.b.relay_client.wait_reservations()
        await s.a.ping(s.b_relayed(), timeout_s=10)
        with trio.fail_after(120):
            await wait_attempt_over(s.b, s.a.peer_id)
        assert s.b.hole_punch.direct_after_s(s.a.peer_id) is None
        assert s.b.hole_punch.stats.failed == 1
        # The relay is the fallback path: the peer is still reachable by id.
        result = await s.a.ping(s.b.peer_id, timeout_s=10)
        assert result.relayed_via == s.relay.peer_id


async def test_bad_hole_punching_input_ends_only_that_exchange(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=33, nat_a=SYMMETRIC, nat_b=PORT_RESTRICTED) as s:
        await s.b.relay_client.wait_reservations()
        await s.a.ping(s.b_relayed(), timeout_s=10)
        with trio.fail_after(120):
            await wait_attempt_over(s.b, s.a.peer_id)
        [relayed] = [c for c in s.b.connections.connections() if c.peer_id == s.a.peer_id]
        # Out of turn: a responder must get Connect first, never Sync.
        stream = await s.b.rpc.open_stream(relayed, PROTOCOL_ID)
        await stream.send_all(encode_message_frame(Sync()))
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await receive_message_frame(stream)  # a resets it
        assert s.a.hole_punch.stats.protocol_errors == 1
        # Garbage: a typed decode error, same ending.
        stream = await s.b.rpc.open_stream(relayed, PROTOCOL_ID)
        await stream.send_all(b"\x00\x05\xc1\xc1\xc1\xc1\xc1")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await receive_message_frame(stream)
        assert s.a.hole_punch.stats.protocol_errors == 2
        # An exchange over a direct connection is refused: hole punching is for relayed ones.
        relay_connection = s.a.connections.connection(s.relay.peer_id)
        assert relay_connection is not None and relay_connection.relayed_via is None
        stream = await s.relay.rpc.open_stream(s.a.peer_id, PROTOCOL_ID)
        await stream.send_all(encode_message_frame(Connect(addresses=[("198.51.100.1", PORT)])))
        with trio.fail_after(10):
            assert await receive_message_frame(stream) is None  # finished without an answer
        assert s.a.hole_punch.stats.refused == 1
        assert s.a.hole_punch.stats.attempts == 3  # b's real one, then the two bad ones
        # The relayed connection and the node carry on.
        assert not relayed.is_closed
        assert (await s.a.ping(s.b.peer_id, timeout_s=10)).relayed_via == s.relay.peer_id


async def test_a_private_node_reserves_on_a_connected_relay_and_is_reached_then_upgraded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=34) as net, AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            Node(identity(100), net.add_host("198.51.100.1", LINK).bind(PORT), config(service=True))
        )
        plain = await stack.enter_async_context(
            Node(identity(101), net.add_host("198.51.100.2", LINK).bind(PORT), config())
        )
        private = NodeConfig(nat=NatConfig(reachability="private"))
        b_host = net.add_nat("203.0.113.2", PORT_RESTRICTED).add_host("192.168.1.10", NAT_LINK)
        b = await stack.enter_async_context(Node(identity(1), b_host.bind(PORT), private, rng=random.Random(1)))
        a_host = net.add_nat("203.0.113.1", PORT_RESTRICTED).add_host("192.168.1.10", NAT_LINK)
        a = await stack.enter_async_context(Node(identity(0), a_host.bind(PORT), config(), rng=random.Random(0)))
        # b knows no relay; it connects to two public peers, only one of which relays.
        assert b.relay_client.reservations() == []
        await b.connect(PeerAddr(("198.51.100.2", PORT), plain.peer_id))
        await b.connect(PeerAddr(("198.51.100.1", PORT), relay.peer_id))
        with trio.fail_after(30):
            await b.relay_client.wait_reservations()
        [reservation] = b.relay_client.reservations()
        assert reservation.relay.peer_id == relay.peer_id
        # The peer without the relay service was never asked (identify does not list HOP).
        assert plain.relay_service.stats.refusals == {}
        assert HOP_PROTOCOL not in b.reachability.peer_protocols[plain.peer_id]
        [b_relayed] = b.relay_client.relayed_addresses()
        result = await a.ping(RelayedAddr.parse(b_relayed), timeout_s=10)
        assert result.relayed_via == relay.peer_id
        with trio.fail_after(60):
            while b.hole_punch.direct_after_s(a.peer_id) is None:
                await b.hole_punch.wait_changed()
        assert (await a.ping(b.peer_id, timeout_s=10)).relayed_via is None


async def test_ping_by_peer_id_finds_a_nated_node_through_its_relay_record_then_goes_direct(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=35) as net, AsyncExitStack() as stack:
        seed_host = net.add_host("198.51.100.1", LINK)
        seed = await stack.enter_async_context(Node(identity(100), seed_host.bind(PORT), config(service=True)))
        seed_string = f"{seed.peer_id}@198.51.100.1:{PORT}"
        # b: private, knows only the bootstrap peer (which happens to serve relaying).
        private = NodeConfig(bootstrap=(seed_string,), nat=NatConfig(reachability="private"))
        b_host = net.add_nat("203.0.113.2", PORT_RESTRICTED).add_host("192.168.1.10", NAT_LINK)
        b = await stack.enter_async_context(Node(identity(1), b_host.bind(PORT), private, rng=random.Random(1)))
        a_host = net.add_nat("203.0.113.1", PORT_RESTRICTED).add_host("192.168.1.10", NAT_LINK)
        a_config = NodeConfig(bootstrap=(seed_string,))
        a = await stack.enter_async_context(Node(identity(0), a_host.bind(PORT), a_config, rng=random.Random(0)))
        with trio.fail_after(60):
            await b.joined_dht.wait()
            await a.joined_dht.wait()
            await b.relay_client.wait_reservations()
            while not b.published_relayed_addresses:
                await b.wait_relayed_addresses_published()
        # Its relayed addresses are in the DHT, signed by b.
        assert (await seed.dht.get(RELAYED_ADDRESSES_KEY, writer=b.peer_id)).record is not None
        # The DHT hands out no private address of b; a knows nothing but b's peer id.
        assert (await a.dht.find_peer(b.peer_id)).addresses is None
        assert a.connections.addresses(b.peer_id) == []
        first = await a.ping(b.peer_id, timeout_s=30)
        assert first.peer_id == b.peer_id and first.relayed_via == seed.peer_id
        with trio.fail_after(60):
            while b.hole_punch.direct_after_s(a.peer_id) is None:
                await b.hole_punch.wait_changed()
        again = await a.ping(b.peer_id, timeout_s=10)
        assert again.relayed_via is None and again.reused_connection


@pytest.mark.parametrize("hairpinning", [True, False])
async def test_two_nodes_behind_one_nat_go_direct_with_or_without_hairpinning(
    autojump_clock: trio.testing.MockClock, hairpinning: bool
) -> None:
    async with Network(seed=36) as net, AsyncExitStack() as stack:
        relay_host = net.add_host("198.51.100.1", LINK)
        relay = await stack.enter_async_context(Node(identity(100), relay_host.bind(PORT), config(service=True)))
        relay_string = f"{relay.peer_id}@198.51.100.1:{PORT}"
        nat = net.add_nat("203.0.113.1", replace(PORT_RESTRICTED, hairpinning=hairpinning))
        settings = config(relays=(relay_string,), reservations=1)
        a = await stack.enter_async_context(
            Node(identity(0), nat.add_host("192.168.1.10", NAT_LINK).bind(PORT), settings, rng=random.Random(0))
        )
        b = await stack.enter_async_context(
            Node(identity(1), nat.add_host("192.168.1.11", NAT_LINK).bind(PORT), settings, rng=random.Random(1))
        )
        await a.relay_client.wait_reservations()
        await b.relay_client.wait_reservations()
        [b_relayed] = b.relay_client.relayed_addresses()
        await a.ping(RelayedAddr.parse(b_relayed), timeout_s=10)
        with trio.fail_after(60):
            await wait_attempt_over(b, a.peer_id)
        result = await a.ping(b.peer_id, timeout_s=10)
        assert result.relayed_via is None
        if not hairpinning:
            # Only the LAN address can work: the NAT does not loop its public address back.
            assert result.remote_address == ("192.168.1.11", PORT)


async def test_hole_punching_switched_off_keeps_the_relayed_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=37) as net, AsyncExitStack() as stack:
        relay_host = net.add_host("198.51.100.1", LINK)
        relay = await stack.enter_async_context(Node(identity(100), relay_host.bind(PORT), config(service=True)))
        relay_string = f"{relay.peer_id}@198.51.100.1:{PORT}"
        off = NodeConfig(
            nat=NatConfig(
                relay=RelayConfig(relays=(relay_string,), reservations=1),
                hole_punch=HolePunchConfig(enabled=False),
            )
        )
        nodes = []
        for i in range(2):
            host = net.add_nat(f"203.0.113.{i + 1}", PORT_RESTRICTED).add_host("192.168.1.10", NAT_LINK)
            nodes.append(await stack.enter_async_context(Node(identity(i), host.bind(PORT), off, rng=random.Random(i))))
        a, b = nodes
        await b.relay_client.wait_reservations()
        [b_relayed] = b.relay_client.relayed_addresses()
        await a.ping(RelayedAddr.parse(b_relayed), timeout_s=10)
        # An exchange a peer starts anyway is refused.
        [relayed] = [c for c in b.connections.connections() if c.peer_id == a.peer_id]
        stream = await b.rpc.open_stream(relayed, PROTOCOL_ID)
        await stream.send_all(encode_message_frame(Connect(addresses=[("203.0.113.2", PORT)])))
        with trio.fail_after(10):
            assert await receive_message_frame(stream) is None
        assert a.hole_punch.stats.refused == 1
        assert a.hole_punch.stats.attempts == b.hole_punch.stats.attempts == 0
        assert (await a.ping(b.peer_id, timeout_s=10)).relayed_via == relay.peer_id


async def test_triggers_racing_at_connection_time_start_one_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=38, nat_a=PORT_RESTRICTED, nat_b=PORT_RESTRICTED) as s:
        await s.b.relay_client.wait_reservations()

        async def address_change_now(connection: Connection) -> None:
            # An observed-address change lands while the relayed connection's own attempt is
            # still opening its stream.
            s.b.hole_punch.addresses_changed()
            await trio.lowlevel.checkpoint()

        s.b.connections.on_connected(address_change_now)
        await s.a.ping(s.b_relayed(), timeout_s=10)
        with trio.fail_after(60):
            await wait_attempt_over(s.b, s.a.peer_id)
        assert s.b.hole_punch.stats.attempts == 1
        assert s.b.hole_punch.direct_after_s(s.a.peer_id) is not None


async def test_a_nat_mapping_that_expires_between_keepalives_loses_no_reservation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # b's NAT forgets an idle mapping after 5 s and picks a random port for the next one, while
    # b's connections send a keepalive only every 15 s: every keepalive leaves from a new
    # public port. The relay must follow b to it (QUIC NAT rebinding) and a's circuit to b
    # must still work.
    forgetful = SimNatConfig(
        mapping=Mapping.ENDPOINT_INDEPENDENT,
        filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
        port_allocation=PortAllocation.RANDOM,
        mapping_timeout_s=5.0,
    )
    async with scene(seed=40, nat_a=PORT_RESTRICTED, nat_b=forgetful) as s:
        keepalive_s = s.b.config.net.keepalive_interval_s
        assert forgetful.mapping_timeout_s < keepalive_s
        await s.b.relay_client.wait_reservations()

        def b_as_the_relay_sees_it() -> tuple[str, int]:
            [connection] = [c for c in s.relay.connections.connections() if c.peer_id == s.b.peer_id]
            return connection.remote_address

        before = b_as_the_relay_sees_it()
        await trio.sleep(3 * keepalive_s)  # idle: the mapping lapses before each keepalive
        assert b_as_the_relay_sees_it() != before
        assert len(s.b.relay_client.reservations()) == 1
        result = await s.a.ping(s.b_relayed(), timeout_s=20)
        assert result.relayed_via == s.relay.peer_id
