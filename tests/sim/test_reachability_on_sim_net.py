"""Observed addresses and AutoNAT reachability between real ``Node``s on sim_net, virtual time.

Four public helpers; one subject on the public core and one behind each kind of NAT. Every
subject dials the helpers, learns its observed address from identify, asks them to dial it back,
and decides its reachability and DHT mode.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.identity import Identity
from lattica.nat.autonat import ReachabilityStatus
from lattica.nat.config import NatConfig as LatticaNatConfig
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Filtering, Host, LinkConfig, Mapping, NatConfig, Network, PortAllocation

PORT = 4001
LINK = LinkConfig(latency_s=0.025)
NAT_LINK = LinkConfig(latency_s=0.005)
HELPERS = 4

FULL_CONE = NatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ENDPOINT_INDEPENDENT)
PORT_RESTRICTED = NatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)
SYMMETRIC = NatConfig(
    mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
    filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
    port_allocation=PortAllocation.RANDOM,
)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"reach-node-%d" % i).digest())


def node_on(host: Host, i: int, config: NodeConfig | None = None) -> Node:
    return Node(
        identity(i),
        host.bind(PORT),
        config or NodeConfig(),
        rng=random.Random(i),
        dial_back_socket_factory=lambda: host.bind(0),
    )


@asynccontextmanager
async def helpers_on(net: Network) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(HELPERS):
            host = net.add_host(f"198.51.{100 + i}.1", LINK)
            nodes.append(await stack.enter_async_context(node_on(host, i)))
        yield nodes


async def settled_reachability(node: Node, helpers: list[Node], *, timeout_s: float = 120) -> ReachabilityStatus:
    """Dial every helper, then wait until the node's reachability is no longer unknown."""
    changed = trio.Event()
    node.reachability.add_listener(lambda status: changed.set())
    for helper in helpers:
        await node.connect(PeerAddr(helper.listen_addresses()[0], helper.peer_id))
    with trio.fail_after(timeout_s):
        await changed.wait()
    return node.reachability.status()


async def test_a_public_node_is_found_public_and_stays_a_dht_server(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=21) as net, helpers_on(net) as helpers:
        host = net.add_host("203.0.113.50", LINK)
        async with node_on(host, 10) as node:
            status = await settled_reachability(node, helpers)
            assert status.reachability == "public"
            assert status.confidence >= 3 and not status.translated
            [believed] = node.reachability.book.believed(trio.current_time())
            assert believed.address == node.socket.local_address and believed.observers == HELPERS
            assert node.reachability.mapping_behaviour() == "endpoint-independent"
            assert not node.dht.client_mode and not node.reachability.relay_reservation_wanted


@pytest.mark.parametrize(
    ("nat_config", "mapping", "dial_backs_arrive"),
    [
        pytest.param(FULL_CONE, "endpoint-independent", True, id="full-cone"),
        pytest.param(PORT_RESTRICTED, "endpoint-independent", False, id="port-restricted"),
        pytest.param(SYMMETRIC, "endpoint-dependent", False, id="symmetric"),
    ],
)
async def test_a_node_behind_a_nat_is_found_private_and_becomes_a_dht_client(
    autojump_clock: trio.testing.MockClock, nat_config: NatConfig, mapping: str, dial_backs_arrive: bool
) -> None:
    async with Network(seed=22) as net, helpers_on(net) as helpers:
        nat = net.add_nat("203.0.113.1", nat_config)
        host = nat.add_host("192.168.1.10", NAT_LINK)
        bootstrap = tuple(f"{h.peer_id}@{h.dial_strings()[0].partition('@')[2]}" for h in helpers[:1])
        async with node_on(host, 10, NodeConfig(bootstrap=bootstrap)) as node:
            # Joined as a DHT server first: the helper it bootstrapped through holds it.
            with trio.fail_after(60):
                await node.joined_dht.wait()
            assert node.peer_id in helpers[0].dht.routing_table
            status = await settled_reachability(node, helpers)
            assert status.reachability == "private"
            assert node.reachability.mapping_behaviour() == mapping
            # Whether dial-backs from a port the node never sent to got through the NAT: only
            # full cone lets them in (a same-socket dial-back would pass port-restricted too).
            assert (status.reachable_results > 0) == dial_backs_arrive
            assert status.translated if dial_backs_arrive else status.unreachable_results >= 3
            assert node.dht.client_mode and node.reachability.relay_reservation_wanted
            # Announced as a client: dropped from the helper's table, and not added elsewhere.
            await node.dht.bootstrap([PeerAddr(h.listen_addresses()[0], h.peer_id) for h in helpers])
            for helper in helpers:
                assert node.peer_id not in helper.dht.routing_table
            assert "/lattica/kad/1.0.0" not in node._served_protocols()


async def test_observations_stay_fresh_on_long_lived_connections_and_reachability_is_rechecked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NodeConfig(nat=LatticaNatConfig(observation_window_s=120, autonat_recheck_interval_s=50))
    async with Network(seed=23) as net, helpers_on(net) as helpers:
        host = net.add_host("203.0.113.50", LINK)
        async with node_on(host, 10, config) as node:
            assert (await settled_reachability(node, helpers)).reachability == "public"
            checks = node.reachability.checks_done
            await trio.sleep(600)  # five windows: only re-identifying keeps the votes alive
            [believed] = node.reachability.book.believed(trio.current_time())
            assert believed.observers == HELPERS
            assert node.reachability.checks_done >= checks + 10
            assert node.reachability.reachability() == "public"
