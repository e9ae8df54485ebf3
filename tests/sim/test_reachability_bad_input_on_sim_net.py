"""Hostile peers against identify and AutoNAT on sim_net: forged observed addresses, dial-backs
aimed at third parties, floods of requests, malformed messages. Each gets a typed refusal (or
is ignored) and nothing else; STUN servers from config feed the same agreement."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.errors import RpcError
from lattica.identity import Identity
from lattica.nat.autonat_messages import (
    AUTONAT_PROTOCOL,
    DialBackRequest,
    decode_dial_back_response,
    encode_autonat,
)
from lattica.nat.config import NatConfig
from lattica.nat.identify import IDENTIFY_PROTOCOL, build_identify, encode_identify
from lattica.nat.stun import decode_message, encode_binding_success
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Host, LinkConfig, Network, SimSocket

PORT = 4001
LINK = LinkConfig(latency_s=0.02)
FORGED = ("192.0.2.66", 6666)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"reach-bad-%d" % i).digest())


def node_on(host: Host, i: int, *, port: int = PORT, config: NodeConfig | None = None) -> Node:
    return Node(
        identity(i),
        host.bind(port),
        config or NodeConfig(),
        rng=random.Random(i),
        dial_back_socket_factory=lambda: host.bind(0),
    )


def at(node: Node) -> PeerAddr:
    return PeerAddr(node.listen_addresses()[0], node.peer_id)


async def test_forged_observed_addresses_from_many_peer_ids_on_one_ip_are_not_believed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=31) as net:
        victim_host = net.add_host("198.51.100.1", LINK)
        attacker_host = net.add_host("198.51.100.66", LINK)
        forged = encode_identify(
            build_identify(listen_addresses=[], protocols=[], agent_version="x", observed_address=FORGED)
        )
        async with node_on(victim_host, 0) as victim:
            for i in range(1, 6):  # five peer ids, one IP, each lying about the victim's address
                async with node_on(attacker_host, i, port=PORT + i) as attacker:
                    await attacker.rpc.request(at(victim), IDENTIFY_PROTOCOL, forged)
            now = trio.current_time()
            assert victim.reachability.book.believed(now) == []
            assert victim.reachability.book.observer_count(now) == 1
            assert victim.reachability.book.candidates(now) == [FORGED]  # worth testing, never believed


async def test_dial_back_requests_for_third_parties_are_refused_and_nothing_is_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=32) as net:
        server_host = net.add_host("198.51.100.1", LINK)
        client_host = net.add_host("198.51.100.2", LINK)
        victim_host = net.add_host("198.51.100.99", LINK)
        victim = victim_host.bind(53)
        async with node_on(server_host, 0) as server, node_on(client_host, 1) as client:

            async def ask(*addresses: tuple[str, int]) -> str | None:
                payload = encode_autonat(DialBackRequest(addresses=list(addresses)))
                reply = decode_dial_back_response(await client.rpc.request(at(server), AUTONAT_PROTOCOL, payload))
                return reply.refusal if reply.status == "refused" else reply.status

            assert await ask(victim.local_address) == "third-party-address"
            assert await ask(client.socket.local_address, victim.local_address) == "third-party-address"
            # Its own address (the IP the connection comes from) is dialled; the client echoes
            # only while it runs a check of its own.
            assert await ask(client.socket.local_address) == "no-echo"
            client.reachability.inbox.expect(until=trio.current_time() + 3600)
            assert await ask(client.socket.local_address) == "ok"
            with pytest.raises(RpcError) as info:
                await client.rpc.request(at(server), AUTONAT_PROTOCOL, b"\xc1not msgpack")
            assert info.value.code == "protocol-error"
            # Rate limit: 6 per minute per peer by default; two were spent above.
            outcomes = [await ask(client.socket.local_address) for _ in range(5)]
            assert outcomes == ["ok"] * 4 + ["rate-limited"]
            assert victim_host.counters.received == 0
            await client.ping(server.peer_id)  # the server still serves


async def test_a_node_without_a_dial_back_socket_refuses_with_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=33) as net:
        server_host = net.add_host("198.51.100.1", LINK)
        client_host = net.add_host("198.51.100.2", LINK)
        async with (
            Node(identity(0), server_host.bind(PORT), NodeConfig()) as server,
            node_on(client_host, 1) as client,
        ):
            payload = encode_autonat(DialBackRequest(addresses=[client.socket.local_address]))
            reply = decode_dial_back_response(await client.rpc.request(at(server), AUTONAT_PROTOCOL, payload))
            assert (reply.status, reply.refusal) == ("refused", "unavailable")


async def answer_stun(sock: SimSocket) -> None:
    """A minimal honest STUN server (RFC 8489 Binding) on a sim_net socket."""
    while True:
        for data, source in await sock.receive_batch():
            await sock.send_to(encode_binding_success(decode_message(data).transaction_id, source), source)


async def test_configured_stun_servers_feed_the_agreement(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=34) as net:
        nat = net.add_nat("203.0.113.1")
        subject_host = nat.add_host("192.168.1.10", LINK)
        servers = [net.add_host(f"198.51.{100 + i}.1", LINK).bind(3478) for i in range(3)]
        config = NodeConfig(nat=NatConfig(stun_servers=tuple(f"{s.local_address[0]}:3478" for s in servers)))
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(answer_stun, server)
            async with Node(identity(0), subject_host.bind(PORT), config, rng=random.Random(0)) as node:
                assert await node.reachability.ask_stun_servers() == 3
                [believed] = node.reachability.book.believed(trio.current_time())
                assert believed.address[0] == "203.0.113.1" and believed.observers == 3
                assert node.reachability.mapping_behaviour() == "endpoint-independent"
            nursery.cancel_scope.cancel()
