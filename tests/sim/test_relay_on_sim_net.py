"""Circuit relay between real ``Node``s on sim_net, in virtual time: two nodes behind
port-restricted NATs (no direct path) reach each other through a public relay, QUIC inside the
circuit, the peer id proven end to end."""

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
from lattica.errors import ConnectError, PeerIdMismatchError
from lattica.identity import Identity
from lattica.nat.config import NatConfig
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_client import RelayRefusedError
from lattica.nat.relay_config import RelayConfig
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Filtering, LinkConfig, Mapping, NatConfig as SimNatConfig, Network

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
        for i in range(relays):
            host = net.add_host(f"198.51.100.{i + 1}", LINK)
            config = relay_config(service=True, **(relay_settings or {}))
            relay_nodes.append(await stack.enter_async_context(Node(identity(100 + i), host.bind(PORT), config, rng=random.Random(i))))
        relay_strings = tuple(f"{r.peer_id}@198.51.100.{i + 1}:{PORT}" for i, r in enumerate(relay_nodes))
        clients = []
        for i, nat_ip in enumerate(("203.0.113.1", "203.0.113.2")):
            nat = net.add_nat(nat_ip, PORT_RESTRICTED)
            host = nat.add_host("192.168.1.10", NAT_LINK)
            settings = {"relays": relay_strings, "reservations": 1, **(client_settings or {})}
            clients.append(
                await stack.enter_async_context(Node(identity(i), host.bind(PORT), relay_config(**settings), rng=random.Random(10 + i)))
            )
        yield Scene(net, relay_nodes, clients[0], clients[1])


async def test_two_nodes_behind_port_restricted_nats_ping_through_a_relay(autojump_clock: trio.testing.MockClock) -> None:
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
