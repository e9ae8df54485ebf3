"""Circuit relay between real ``Node``s on sim_net, in virtual time: two nodes behind
port-restricted NATs (no direct path) reach each other through a public relay, QUIC inside the
circuit, the peer id proven end to end."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from lattica.config import NodeConfig
from lattica.content.exchange_service import _host_of
from lattica.errors import ConnectError, PeerIdMismatchError, RpcError
from lattica.identity import Identity
from lattica.nat.config import NatConfig
from lattica.nat.hole_punch_config import HolePunchConfig
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_client import RelayRefusedError
from lattica.nat.relay_config import RelayConfig
from lattica.nat.relay_messages import HOP_PROTOCOL, CircuitLimits, Connect, Connected, Refused, Reserved
from lattica.nat.relay_stream import receive_hop_message, send_relay_message
from lattica.net.address import PeerAddr
from lattica.net.config import ALPN_PROTOCOL
from lattica.net.rpc import PING_PROTOCOL, _call_group, source_group
from lattica.node import Node
from lattica.wire import encode_frame
from sim_net import Filtering, Host, LinkConfig, Mapping, Nat, Network
from sim_net import NatConfig as SimNatConfig

PORT = 4001
LINK = LinkConfig(latency_s=0.025)
NAT_LINK = LinkConfig(latency_s=0.005)
PORT_RESTRICTED = SimNatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"relay-node-%d" % i).digest())


def relay_config(**settings: object) -> NodeConfig:
    return NodeConfig(nat=NatConfig(relay=RelayConfig(**settings)))  # type: ignore[arg-type]


@dataclass
class Scene:
    net: Network
    relays: list[Node]
    a: Node
    b: Node
    relay_hosts: list[Host]
    nats: list[Nat]

    def relay_addr(self, index: int = 0) -> PeerAddr:
        relay = self.relays[index]
        return PeerAddr(relay.socket.local_address, relay.peer_id)


@asynccontextmanager
async def scene(
    *,
    seed: int,
    relays: int = 1,
    relay_settings: dict[str, object] | None = None,
    client_settings: dict[str, object] | None = None,
) -> AsyncIterator[Scene]:
    """``relays`` public relays; nodes a and b each behind its own port-restricted NAT, both
    configured with every relay (b and a reserve on them)."""
    async with Network(seed=seed) as net, AsyncExitStack() as stack:
        relay_nodes = []
        relay_hosts = []
        nats = []
        for i in range(relays):
            host = net.add_host(f"198.51.100.{i + 1}", LINK)
            relay_hosts.append(host)
            config = relay_config(**{"service": True, **(relay_settings or {})})
            relay_nodes.append(
                await stack.enter_async_context(Node(identity(100 + i), host.bind(PORT), config, rng=random.Random(i)))
            )
        relay_strings = tuple(f"{r.peer_id}@198.51.100.{i + 1}:{PORT}" for i, r in enumerate(relay_nodes))
        clients = []
        for i, nat_ip in enumerate(("203.0.113.1", "203.0.113.2")):
            nat = net.add_nat(nat_ip, PORT_RESTRICTED)
            nats.append(nat)
            host = nat.add_host("192.168.1.10", NAT_LINK)
            settings = {"relays": relay_strings, "reservations": 1, **(client_settings or {})}
            clients.append(
                await stack.enter_async_context(
                    Node(identity(i), host.bind(PORT), relay_config(**settings), rng=random.Random(10 + i))
                )
            )
        yield Scene(net, relay_nodes, clients[0], clients[1], relay_hosts, nats)


async def test_two_nodes_behind_port_restricted_nats_ping_through_a_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=21) as s:
        await s.a.relay_client.wait_reservations()
        await s.b.relay_client.wait_reservations()
        [b_relayed] = s.b.relay_client.relayed_addresses()
        assert b_relayed == f"{s.relays[0].peer_id}@198.51.100.1:{PORT}/relay/{s.b.peer_id}"
        # No direct path: b's NAT filters a's packets (a never sent to... b's mapping).
        with pytest.raises(ConnectError):
            await s.a.connect(PeerAddr(("203.0.113.2", PORT), s.b.peer_id), timeout_s=3)
        result = await s.a.ping(RelayedAddr.parse(b_relayed), timeout_s=10)
        assert result.peer_id == s.b.peer_id
        assert result.reused_connection is False
        [connection] = [c for c in s.a.connections.connections() if c.peer_id == s.b.peer_id]
        assert connection.relayed_via == s.relays[0].peer_id
        assert connection.remote_address == s.relays[0].socket.local_address
        # b sees an inbound relayed connection from a, proven by the same handshake.
        [inbound] = [c for c in s.b.connections.connections() if c.peer_id == s.a.peer_id]
        assert inbound.direction == "inbound" and inbound.relayed_via == s.relays[0].peer_id
        # The relay forwarded bytes and saw the circuit; a second ping reuses the connection.
        assert s.relays[0].relay_service.stats.circuits_opened == 1
        assert s.relays[0].relay_service.stats.bytes_forwarded > 0
        again = await s.a.ping(RelayedAddr.parse(b_relayed))
        assert again.reused_connection is True
        # A relayed connection's address is never remembered as the peer's.
        assert s.a.connections.addresses(s.b.peer_id) == []


async def test_peers_behind_a_relay_count_each_as_a_host_for_upload_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: counted as their relay, every fetcher of a seeder behind a NAT was one
    # host with an attacker reaching it the same way, and none could take a slot from it. Ids
    # behind a relay are bounded by the relay instead (8 circuits to a reserved node).
    async with scene(seed=21) as s:
        await s.b.relay_client.wait_reservations()
        [b_relayed] = s.b.relay_client.relayed_addresses()
        await s.a.ping(RelayedAddr.parse(b_relayed), timeout_s=10)
        [inbound] = [c for c in s.b.connections.connections() if c.peer_id == s.a.peer_id]
        stream = SimpleNamespace(connection=inbound)  # what the seeder reads of a stream
        assert inbound.relayed_via is not None
        assert source_group(stream.connection) is None  # no per-address cap: the address is the relay's
        assert _host_of(source_group(stream.connection), s.a.peer_id) == ("peer", s.a.peer_id)
        # RPC calls, though, count under the relay: a hostile relay brings any number of ids
        # (third review: 16 ids through one relay held all 512 calls of the node behind it).
        assert _call_group(inbound) == f"relay {s.relays[0].peer_id}"


async def test_a_circuit_over_its_byte_limit_is_closed_cleanly_and_the_reservation_is_renewed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = {"circuit_bytes": 32 * 1024, "reservation_ttl_s": 60.0}
    async with scene(seed=22, relay_settings=settings) as s:
        await s.b.relay_client.wait_reservations()
        [b_relayed] = s.b.relay_client.relayed_addresses()
        connection = await s.a.connect(RelayedAddr.parse(b_relayed), timeout_s=10)
        await s.a.rpc.ping(connection)  # small: within the limit
        relay = s.relays[0].relay_service
        with pytest.raises(RpcError):
            # 48 KiB echoed: more than the circuit may carry in one direction.
            await s.a.rpc.request(connection, PING_PROTOCOL, bytes(48 * 1024), timeout_s=5)
        await connection.wait_closed()
        assert relay.stats.circuits_closed_by_limit == 1
        assert relay.book.circuit_count == 0
        assert s.a.relay_client.circuit_count() == 0
        with trio.fail_after(10):
            while s.b.relay_client.circuit_count():
                await s.b.relay_client.wait_changed()
        # The reservation outlives the circuit and is renewed before its 60 s run out.
        await trio.sleep(120)
        [reservation] = s.b.relay_client.reservations()
        assert reservation.renewals >= 3
        assert reservation.expires_at > trio.current_time()
        assert relay.stats.reservations_renewed >= 3 and relay.stats.reservations_granted == 2  # a and b
        # A new circuit works.
        result = await s.a.ping(RelayedAddr.parse(b_relayed), timeout_s=10)
        assert result.peer_id == s.b.peer_id and result.reused_connection is False


async def test_a_relay_that_dies_is_replaced_by_another_known_relay(autojump_clock: trio.testing.MockClock) -> None:
    async with scene(seed=23, relays=2) as s:
        await s.b.relay_client.wait_reservations()
        [first] = s.b.relay_client.reservations()
        first_relay = next(r for r in s.relays if r.peer_id == first.relay.peer_id)
        other_relay = next(r for r in s.relays if r is not first_relay)
        # The relay's host disappears from the network (its packets are lost both ways).
        dead = s.relay_hosts[s.relays.index(first_relay)]
        s.net.partition([dead], [*s.nats, *(h for h in s.relay_hosts if h is not dead)])
        with trio.fail_after(300):
            while [r.relay.peer_id for r in s.b.relay_client.reservations()] != [other_relay.peer_id]:
                await s.b.relay_client.wait_changed()
        assert s.b.relay_client.stats.reservations_lost == 1
        [b_relayed] = s.b.relay_client.relayed_addresses()
        assert b_relayed.startswith(str(other_relay.peer_id))
        result = await s.a.ping(RelayedAddr.parse(b_relayed), timeout_s=10)
        assert result.peer_id == s.b.peer_id


async def test_a_circuit_to_a_peer_without_a_reservation_is_refused_with_a_typed_code(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=24, client_settings={"relays": ()}) as s:
        # Neither client reserved anything.
        assert s.b.relay_client.reservations() == []
        target = RelayedAddr(s.relay_addr(), s.b.peer_id)
        with pytest.raises(RelayRefusedError) as refused:
            await s.a.connect(target, timeout_s=10)
        assert refused.value.code == "no-reservation"
        assert s.relays[0].relay_service.stats.refusals == {"no-reservation": 1}
        assert s.relays[0].relay_service.book.circuit_count == 0


async def test_a_node_without_the_service_refuses_reservations(autojump_clock: trio.testing.MockClock) -> None:
    async with scene(seed=25, relay_settings={"service": False}) as s:
        await trio.sleep(5)
        assert s.b.relay_client.reservations() == []
        assert s.relays[0].relay_service.stats.refusals == {"service-disabled": 2}
        target = RelayedAddr(s.relay_addr(), s.b.peer_id)
        with pytest.raises(RelayRefusedError, match="service-disabled"):
            await s.a.connect(target, timeout_s=10)


async def test_a_relay_client_over_its_per_peer_circuit_cap_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with scene(seed=26, relay_settings={"max_circuits_per_peer": 2}) as s:
        await s.b.relay_client.wait_reservations()
        target = RelayedAddr.parse(s.b.relay_client.relayed_addresses()[0])
        first = await s.a.relay_client.connect(target)
        second = await s.a.relay_client.connect(target)
        assert first is not second and first.peer_id == second.peer_id == s.b.peer_id
        with pytest.raises(RelayRefusedError) as refused:
            await s.a.relay_client.connect(target)
        assert refused.value.code == "too-many-per-peer"
        # Closing one frees its slot.
        await first.aclose()
        with trio.fail_after(10):
            while s.relays[0].relay_service.book.circuit_count != 1:
                await s.relays[0].relay_service.wait_changed()
        third = await s.a.relay_client.connect(target)
        assert third.peer_id == s.b.peer_id


async def _two_circuits_then_a_third(
    s: Scene, stack: AsyncExitStack, first_id: int
) -> pytest.ExceptionInfo[RelayRefusedError]:
    """Three nodes with fresh ids on another machine behind a's NAT (one source address) dial
    b through the relay: the first two must get circuits; returns how the third was refused."""
    await s.b.relay_client.wait_reservations()
    target = RelayedAddr.parse(s.b.relay_client.relayed_addresses()[0])
    host = s.nats[0].add_host("192.168.1.11", NAT_LINK)
    # The hog keeps its circuits: a hole punch would replace them with direct connections.
    keep_circuits = NodeConfig(nat=NatConfig(hole_punch=HolePunchConfig(enabled=False)))
    minted = [
        await stack.enter_async_context(
            Node(identity(first_id + i), host.bind(PORT + i), keep_circuits, rng=random.Random(first_id + i))
        )
        for i in range(3)
    ]
    for node in minted[:2]:
        assert (await node.relay_client.connect(target)).peer_id == s.b.peer_id
    with pytest.raises(RelayRefusedError) as refused:
        await minted[2].relay_client.connect(target)
    return refused


async def test_peer_ids_minted_behind_one_address_get_two_circuits_to_a_target_not_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: the per-peer caps let one host with eight fresh ids take all eight
    # circuits to a node behind a NAT on a relay, so no one else could reach it there.
    async with scene(seed=27) as s, AsyncExitStack() as stack:
        refused = await _two_circuits_then_a_third(s, stack, first_id=50)
        assert refused.value.code == "too-many-per-peer" and "from your address" in str(refused.value)
        assert s.relays[0].relay_service.book.circuit_count == 2  # the target's other six stay free


async def test_a_target_accepts_at_most_max_circuits_per_relay_through_one_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: the relay's caps bind only an honest relay; one whose owner raised them
    # filled every circuit b would accept with ids minted on one host, and nobody reached b
    # through its other relays. b now takes at most max_circuits_per_relay through any one.
    lax = {"max_circuits_per_ip_to_target": 100, "max_circuits_per_ip": 100, "max_circuits_per_peer": 100}
    async with (
        scene(seed=28, relay_settings=lax, client_settings={"max_circuits_per_relay": 2}) as s,
        AsyncExitStack() as stack,
    ):
        refused = await _two_circuits_then_a_third(s, stack, first_id=70)
        assert "the target refused: resource-limit" in str(refused.value)


async def test_one_circuit_carries_at_most_two_connections_not_a_flood_of_initials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: connections over a relay circuit were not counted per source, and one
    # circuit turned every Initial with a fresh connection id into a half-open connection at
    # the target: 256 a second filled its max_connections and every other dial failed.
    async with scene(seed=29, client_settings={}) as s, AsyncExitStack() as stack:
        await s.b.relay_client.wait_reservations()
        target = RelayedAddr.parse(s.b.relay_client.relayed_addresses()[0])
        attacker_host = s.net.add_nat("203.0.113.66", PORT_RESTRICTED).add_host("192.168.1.10", NAT_LINK)
        keep_circuits = NodeConfig(nat=NatConfig(hole_punch=HolePunchConfig(enabled=False)))
        attacker = await stack.enter_async_context(
            Node(identity(81), attacker_host.bind(PORT), keep_circuits, rng=random.Random(81))
        )
        path = (await attacker.relay_client.connect(target)).path
        honest_host = s.net.add_nat("203.0.113.9", PORT_RESTRICTED).add_host("192.168.1.10", NAT_LINK)
        honest = await stack.enter_async_context(
            Node(identity(80), honest_host.bind(PORT), relay_config(), rng=random.Random(80))
        )

        def initial() -> bytes:
            quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN_PROTOCOL]))
            quic.connect(("192.0.2.1", 1), now=trio.current_time())
            return quic.datagrams_to_send(now=trio.current_time())[0][0]

        async with trio.open_nursery() as nursery:

            async def flood() -> None:
                for _ in range(600):  # bounded: 10 virtual minutes
                    await attacker.endpoint._send([(initial(), path) for _ in range(256)])
                    await trio.sleep(1)

            nursery.start_soon(flood)
            await trio.sleep(3)
            assert len(s.b.endpoint._cids_of) <= 4  # the relay's, a's and one more; was ~770
            connection = await honest.relay_client.connect(target, timeout_s=10)  # failed before
            assert connection.peer_id == s.b.peer_id
            nursery.cancel_scope.cancel()


async def test_reservations_beyond_the_relay_caps_are_refused(autojump_clock: trio.testing.MockClock) -> None:
    # a and b come from different IPs; a cap of one reservation in all refuses the second.
    async with scene(seed=27, relay_settings={"max_reservations": 1}) as s:
        relay = s.relays[0].relay_service
        with trio.fail_after(30):
            while relay.stats.reservations_granted + sum(relay.stats.refusals.values()) < 2:
                await relay.wait_changed()
        [holder] = [n for n in (s.a, s.b) if relay.book.reservation(n.peer_id, trio.current_time())]
        await holder.relay_client.wait_reservations()
        other = s.b if holder is s.a else s.a
        assert other.relay_client.reservations() == []
        assert s.relays[0].relay_service.stats.refusals == {"resource-limit": 1}


async def test_the_target_peer_id_is_proven_end_to_end_through_a_lying_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=28) as s:
        await s.a.relay_client.wait_reservations()
        await s.b.relay_client.wait_reservations()
        relay = s.relays[0].relay_service
        # The relay routes every circuit to a, whoever was asked for.
        book_open = relay.book.open_circuit
        relay.book.open_circuit = lambda source, target, now, **kw: book_open(source, s.a.peer_id, now, **kw)  # type: ignore[method-assign]
        c = identity(50).peer_id
        # c holds no reservation, but the relay lies and opens a circuit to a: the handshake
        # through it proves a's key, not c's.
        with pytest.raises(PeerIdMismatchError):
            await s.b.connect(RelayedAddr(s.relay_addr(), c), timeout_s=10)


async def test_a_target_refuses_circuits_from_a_relay_it_holds_no_reservation_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=29, relays=2, client_settings={"reservations": 1}) as s:
        await s.b.relay_client.wait_reservations()
        [held] = s.b.relay_client.reservations()
        other = next(r for r in s.relays if r.peer_id != held.relay.peer_id)
        other_addr = PeerAddr(other.socket.local_address, other.peer_id)
        await s.b.ping(other_addr)  # b is connected to the other relay, without a reservation
        # The other relay pretends b reserved with it and sends b a STOP.
        other.relay_service.book.reservation = lambda peer, now: object()  # type: ignore[method-assign,assignment,return-value]
        with pytest.raises(RelayRefusedError) as refused:
            await s.a.connect(RelayedAddr(other_addr, s.b.peer_id), timeout_s=10)
        assert refused.value.code == "permission-denied", refused.value
        assert s.b.relay_client.stats.circuits_accepted == 0
        assert s.b.relay_client.circuit_count() == 0


async def test_garbage_on_a_relay_stream_gets_a_typed_refusal_and_the_relay_keeps_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=30) as s:
        await s.b.relay_client.wait_reservations()
        relay = s.relays[0]
        hostile = [
            b"\x00\x00\x10\x00\x01" + bytes(64),  # announces 4 KiB: over the limit, body never read
            b"\x00\x00\x00\x03\x01\xc1\xc1",  # not msgpack of any message
            b"\x00\x00\x00\x02\x01",  # truncated, then EOF
            encode_frame(Reserved(1.0, CircuitLimits(duration_s=1.0, max_bytes=1))),  # a relay's answer
        ]
        for data in hostile:
            stream = await s.a.rpc.open_stream(s.relay_addr(), HOP_PROTOCOL)
            await stream.send_all(data)
            await stream.send_eof()
            answer = await receive_hop_message(stream)
            assert isinstance(answer, Refused) and answer.code in ("malformed", "unexpected-message")
            await stream.aclose()
        assert relay.relay_service.stats.refusals == {"malformed": 3, "unexpected-message": 1}
        # b's reservation and the service are untouched.
        result = await s.a.ping(RelayedAddr.parse(s.b.relay_client.relayed_addresses()[0]), timeout_s=10)
        assert result.peer_id == s.b.peer_id


async def test_closing_the_connection_at_either_end_closes_its_circuit_everywhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=31) as s:
        await s.b.relay_client.wait_reservations()
        target = RelayedAddr.parse(s.b.relay_client.relayed_addresses()[0])
        relay = s.relays[0].relay_service
        for closing_end in ("a", "b"):
            connection = await s.a.connect(target, timeout_s=10)
            await s.a.rpc.ping(connection)
            assert relay.book.circuit_count == 1 and s.b.relay_client.circuit_count() == 1
            if closing_end == "a":
                await connection.aclose()
            else:
                [inbound] = [c for c in s.b.connections.connections() if c.relayed_via is not None]
                await inbound.aclose()
            with trio.fail_after(5):
                for client in (s.a.relay_client, s.b.relay_client):
                    while client.circuit_count():
                        await client.wait_changed()
                while relay.book.circuit_count:
                    await relay.wait_changed()
        assert [r.relay.peer_id for r in s.b.relay_client.reservations()] == [s.relays[0].peer_id]


async def test_a_circuit_that_carries_no_handshake_is_closed_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(seed=32) as s:
        await s.b.relay_client.wait_reservations()
        relay = s.relays[0].relay_service
        # A client that asks for a circuit and then sends nothing through it.
        stream = await s.a.rpc.open_stream(s.relay_addr(), HOP_PROTOCOL)
        await send_relay_message(stream, Connect(s.b.peer_id.key))
        assert isinstance(await receive_hop_message(stream), Connected)
        opened_at = trio.current_time()
        assert s.b.relay_client.circuit_count() == 1
        with trio.fail_after(60):
            while relay.book.circuit_count:
                await relay.wait_changed()
        waited_s = trio.current_time() - opened_at
        # b closed it a handshake timeout after accepting it (the relay's answer to us came later).
        assert waited_s == pytest.approx(s.b.endpoint.config.handshake_timeout_s, abs=0.1)
        assert s.b.relay_client.circuit_count() == 0
        assert await stream.receive_some() == b""  # the relay finished our end cleanly


async def test_reserve_asks_a_refusing_relay_again_every_retry_interval(autojump_clock: trio.testing.MockClock) -> None:
    async with scene(seed=33, relay_settings={"service": False}, client_settings={"relays": ()}) as s:
        relay = s.relays[0].relay_service
        retry_s = s.b.relay_client.config.retry_s
        with trio.move_on_after(2.5 * retry_s):
            await s.b.relay_client.reserve(s.relay_addr())
        # Asked at 0, retry_s and 2 * retry_s; refused each time, no reservation.
        assert relay.stats.refusals == {"service-disabled": 3}
        assert s.b.relay_client.reservations() == []
        assert s.b.relay_client.stats.reservations_made == 0
