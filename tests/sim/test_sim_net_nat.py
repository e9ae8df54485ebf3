"""sim_net NAT boxes behave as RFC 4787 describes, checked datagram by datagram."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from sim_net import (
    Address,
    Filtering,
    Mapping,
    Nat,
    NatConfig,
    Network,
    PortAllocation,
    SimSocket,
)

NAT_IP = "203.0.113.1"
S1_IP = "198.51.100.1"
S2_IP = "198.51.100.2"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@dataclass
class Scene:
    """A client at 192.168.1.10:5000 behind one NAT; two servers S1 and S2 on the internet,
    each listening on ports 3478 and 3479."""

    net: Network
    nat: Nat
    client: SimSocket
    s1a: SimSocket
    s1b: SimSocket
    s2a: SimSocket


@asynccontextmanager
async def nat_scene(config: NatConfig, seed: int = 1) -> AsyncIterator[Scene]:
    async with Network(seed=seed) as net:
        s1 = net.add_host(S1_IP)
        s2 = net.add_host(S2_IP)
        nat = net.add_nat(NAT_IP, config)
        client = nat.add_host("192.168.1.10").bind(5000)
        yield Scene(net, nat, client, s1.bind(3478), s1.bind(3479), s2.bind(3478))


async def receive_one(sock: SimSocket) -> tuple[bytes, Address]:
    # A bound in virtual time turns "never arrives" into a failure instead of a hang.
    with trio.fail_after(10):
        [datagram] = await sock.receive_batch()
    return datagram


async def arrives_within(sock: SimSocket, seconds: float = 1.0) -> bool:
    with trio.move_on_after(seconds):
        await sock.receive_batch()
        return True
    return False


async def mapped_source(client: SimSocket, server: SimSocket) -> Address:
    """Send from ``client`` to ``server``; return the source the server sees."""
    await client.send_to(b"probe", server.local_address)
    _, source = await receive_one(server)
    return source


async def test_endpoint_independent_mapping_keeps_one_port_for_all_destinations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nat_scene(NatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT)) as scene:
        sources = [await mapped_source(scene.client, s) for s in (scene.s1a, scene.s1b, scene.s2a)]
        assert {ip for ip, _ in sources} == {NAT_IP}
        assert len({port for _, port in sources}) == 1


async def test_address_dependent_mapping_uses_a_new_port_per_destination_ip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nat_scene(NatConfig(mapping=Mapping.ADDRESS_DEPENDENT)) as scene:
        s1a, s1b, s2a = [(await mapped_source(scene.client, s))[1] for s in (scene.s1a, scene.s1b, scene.s2a)]
        assert s1a == s1b
        assert s2a != s1a


async def test_address_and_port_dependent_mapping_uses_a_new_port_per_destination_endpoint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nat_scene(NatConfig(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT)) as scene:
        ports = [(await mapped_source(scene.client, s))[1] for s in (scene.s1a, scene.s1b, scene.s2a)]
        assert len(set(ports)) == 3
        assert len(scene.nat.mappings()) == 3


async def test_inbound_without_a_mapping_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    async with nat_scene(NatConfig(filtering=Filtering.ENDPOINT_INDEPENDENT)) as scene:
        await scene.s1a.send_to(b"unsolicited", (NAT_IP, 5000))
        assert not await arrives_within(scene.client)
        assert scene.nat.counters.dropped["nat_no_mapping"] == 1


async def test_endpoint_independent_filtering_accepts_anyone_once_mapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nat_scene(NatConfig(filtering=Filtering.ENDPOINT_INDEPENDENT)) as scene:
        public = await mapped_source(scene.client, scene.s1a)
        await scene.s2a.send_to(b"from a stranger", public)
        assert await receive_one(scene.client) == (b"from a stranger", (S2_IP, 3478))


async def test_address_dependent_filtering_accepts_only_contacted_addresses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nat_scene(NatConfig(filtering=Filtering.ADDRESS_DEPENDENT)) as scene:
        public = await mapped_source(scene.client, scene.s1a)
        await scene.s2a.send_to(b"stranger", public)
        assert not await arrives_within(scene.client)
        assert scene.nat.counters.dropped["nat_filter"] == 1
        await scene.s1b.send_to(b"contacted ip, other port", public)
        assert await receive_one(scene.client) == (b"contacted ip, other port", (S1_IP, 3479))


async def test_address_and_port_dependent_filtering_drops_other_ports_of_a_contacted_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nat_scene(NatConfig(filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)) as scene:
        public = await mapped_source(scene.client, scene.s1a)
        await scene.s1b.send_to(b"other port", public)
        assert not await arrives_within(scene.client)
        assert scene.nat.counters.dropped["nat_filter"] == 1
        await scene.s1a.send_to(b"contacted endpoint", public)
        assert await receive_one(scene.client) == (b"contacted endpoint", (S1_IP, 3478))


async def test_mapping_expires_after_timeout_and_random_allocation_picks_a_new_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NatConfig(
        filtering=Filtering.ENDPOINT_INDEPENDENT,
        port_allocation=PortAllocation.RANDOM,
        mapping_timeout_s=30.0,
    )
    async with nat_scene(config) as scene:
        public = await mapped_source(scene.client, scene.s1a)  # mapped at t=0
        await trio.sleep_until(29.5)
        await scene.s1a.send_to(b"in time", public)
        assert await receive_one(scene.client) == (b"in time", scene.s1a.local_address)

        await trio.sleep_until(30.5)
        await scene.s1a.send_to(b"too late", public)
        assert not await arrives_within(scene.client)
        assert scene.nat.counters.dropped["nat_no_mapping"] == 1
        assert scene.nat.mappings() == []

        renewed = await mapped_source(scene.client, scene.s1a)
        assert renewed[1] != public[1]


async def test_outbound_traffic_refreshes_the_mapping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NatConfig(filtering=Filtering.ENDPOINT_INDEPENDENT, mapping_timeout_s=30.0)
    async with nat_scene(config) as scene:
        public = await mapped_source(scene.client, scene.s1a)
        await trio.sleep_until(20.0)
        await scene.client.send_to(b"keepalive", scene.s2a.local_address)
        await trio.sleep_until(45.0)
        await scene.s1a.send_to(b"still mapped", public)
        assert await arrives_within(scene.client)
        await trio.sleep_until(50.5)
        await scene.s1a.send_to(b"expired", public)
        assert not await arrives_within(scene.client)


async def test_inbound_traffic_refreshes_the_mapping_only_when_configured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for inbound_refreshes, delivered_at_45s in ((False, False), (True, True)):
        config = NatConfig(
            filtering=Filtering.ENDPOINT_INDEPENDENT,
            mapping_timeout_s=30.0,
            inbound_refreshes=inbound_refreshes,
        )
        async with nat_scene(config) as scene:
            start = trio.current_time()
            public = await mapped_source(scene.client, scene.s1a)
            await trio.sleep_until(start + 20.0)
            await scene.s1a.send_to(b"inbound", public)
            assert await arrives_within(scene.client)
            await trio.sleep_until(start + 45.0)
            await scene.s1a.send_to(b"later", public)
            assert await arrives_within(scene.client) == delivered_at_45s


async def hairpin_scene(hairpinning: bool) -> tuple[Nat, bool]:
    """Two hosts behind one NAT; B sends to A's public mapping. Returns whether A got it
    from B's public mapping."""
    config = NatConfig(
        mapping=Mapping.ENDPOINT_INDEPENDENT,
        filtering=Filtering.ENDPOINT_INDEPENDENT,
        hairpinning=hairpinning,
    )
    async with Network(seed=3) as net:
        server = net.add_host(S1_IP).bind(3478)
        nat = net.add_nat(NAT_IP, config)
        a = nat.add_host("192.168.1.10").bind(5000)
        b = nat.add_host("192.168.1.11").bind(6000)
        a_public = await mapped_source(a, server)
        b_public = await mapped_source(b, server)
        await b.send_to(b"hairpin", a_public)
        with trio.move_on_after(1.0):
            assert await receive_one(a) == (b"hairpin", b_public)
            return nat, True
        return nat, False


async def test_hairpinning_delivers_to_an_inside_host_with_the_public_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nat, delivered = await hairpin_scene(hairpinning=True)
    assert delivered
    assert nat.counters.hairpinned == 1


async def test_without_hairpinning_a_datagram_to_the_own_public_address_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nat, delivered = await hairpin_scene(hairpinning=False)
    assert not delivered
    assert nat.counters.dropped["hairpin"] == 1


async def test_port_preservation_keeps_the_internal_port_while_it_is_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=5) as net:
        server = net.add_host(S1_IP).bind(3478)
        nat = net.add_nat(NAT_IP, NatConfig(port_allocation=PortAllocation.PRESERVE))
        first = nat.add_host("192.168.1.10").bind(5000)
        second = nat.add_host("192.168.1.11").bind(5000)
        assert await mapped_source(first, server) == (NAT_IP, 5000)
        _, second_port = await mapped_source(second, server)
        assert second_port != 5000
        assert 1024 <= second_port <= 65535


async def test_random_allocation_does_not_preserve_the_internal_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NatConfig(port_allocation=PortAllocation.RANDOM, port_range=(20000, 20999))
    async with Network(seed=5) as net:
        server = net.add_host(S1_IP).bind(3478)
        nat = net.add_nat(NAT_IP, config)
        client = nat.add_host("192.168.1.10").bind(5000)
        _, port = await mapped_source(client, server)
        assert 20000 <= port <= 20999


async def test_nested_nat_translates_twice_and_replies_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    eif = NatConfig(filtering=Filtering.ENDPOINT_INDEPENDENT)
    async with Network(seed=2) as net:
        server = net.add_host(S1_IP).bind(3478)
        carrier = net.add_nat(NAT_IP, NatConfig())
        home = carrier.add_nat("100.64.0.2", eif)
        client = home.add_host("192.168.1.10").bind(5000)
        public = await mapped_source(client, server)
        assert public[0] == NAT_IP
        await server.send_to(b"reply", public)
        assert await receive_one(client) == (b"reply", server.local_address)
        assert home.mappings()[0].external == ("100.64.0.2", 5000)
