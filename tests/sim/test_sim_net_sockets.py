"""sim_net sockets keep the DatagramSocket contract; partitions cut and heal traffic."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from sim_net import Address, LinkConfig, NatConfig, Network, SimSocket


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def receive(sock: SimSocket, max_datagrams: int = 64) -> list[tuple[bytes, Address]]:
    # A bound in virtual time turns "never arrives" into a failure instead of a hang.
    with trio.fail_after(10):
        return await sock.receive_batch(max_datagrams)


async def arrives_within(sock: SimSocket, seconds: float = 1.0) -> bool:
    with trio.move_on_after(seconds):
        await receive(sock)
        return True
    return False


async def test_receive_batch_returns_every_queued_datagram_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        a = net.add_host("198.51.100.1").bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        for n in range(5):
            await a.send_to(bytes([n]), b.local_address)
        await trio.sleep(1)
        assert [data for data, _ in await receive(b, max_datagrams=3)] == [b"\0", b"\1", b"\2"]
        assert await receive(b) == [(b"\3", a.local_address), (b"\4", a.local_address)]


async def test_receive_batch_waits_for_the_first_datagram(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        a = net.add_host("198.51.100.1").bind(1)
        b = net.add_host("198.51.100.2", LinkConfig(latency_s=0.5)).bind(2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_to, b"late", b.local_address)
            assert await receive(b) == [(b"late", a.local_address)]
        assert trio.current_time() == pytest.approx(0.5)


async def test_send_to_is_a_checkpoint(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=1) as net:
        a = net.add_host("198.51.100.1").bind(1)
        with trio.testing.assert_checkpoints():
            await a.send_to(b"x", ("198.51.100.9", 9))


async def test_close_is_idempotent_and_later_calls_raise_closed_resource_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        sock = net.add_host("198.51.100.1").bind(1)
        sock.close()
        sock.close()
        with pytest.raises(trio.ClosedResourceError):
            await sock.send_to(b"x", ("198.51.100.2", 2))
        with pytest.raises(trio.ClosedResourceError):
            await receive(sock)


async def test_close_wakes_a_pending_receive_with_closed_resource_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        sock = net.add_host("198.51.100.1").bind(1)

        async def close_later() -> None:
            await trio.sleep(1)
            sock.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_later)
            with pytest.raises(trio.ClosedResourceError):
                await receive(sock)


async def test_leaving_the_network_closes_its_sockets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        sock = net.add_host("198.51.100.1").bind(1)
    assert sock.closed
    with pytest.raises(trio.ClosedResourceError):
        await receive(sock)


async def test_binding_a_used_port_raises_eaddrinuse_until_it_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        host = net.add_host("198.51.100.1")
        first = host.bind(4000)
        with pytest.raises(OSError) as raised:
            host.bind(4000)
        assert raised.value.errno == errno.EADDRINUSE
        first.close()
        assert host.bind(4000).local_address == ("198.51.100.1", 4000)


async def test_port_zero_picks_distinct_free_ephemeral_ports(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        host = net.add_host("198.51.100.1")
        ports = [host.bind(0).local_address[1] for _ in range(50)]
        assert len(set(ports)) == 50
        assert all(49152 <= port <= 65535 for port in ports)


async def test_datagram_to_an_unbound_port_or_unknown_address_is_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        a = net.add_host("198.51.100.1").bind(1)
        net.add_host("198.51.100.2")
        await a.send_to(b"nobody listens", ("198.51.100.2", 9))
        await a.send_to(b"nobody there", ("192.0.2.77", 9))
        await trio.sleep(1)
        dropped = net.counters().dropped
        assert dropped["no_socket"] == 1
        assert dropped["no_route"] == 1


async def test_partition_cuts_traffic_between_groups_until_healed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        a_host, b_host = net.add_host("198.51.100.1"), net.add_host("198.51.100.2")
        a, b = a_host.bind(1), b_host.bind(2)
        c = net.add_host("198.51.100.3").bind(3)
        cut = net.partition([a_host], [b_host])
        await a.send_to(b"across", b.local_address)
        await b.send_to(b"back", a.local_address)
        await a.send_to(b"aside", c.local_address)
        assert not await arrives_within(b)
        assert not await arrives_within(a)
        assert await arrives_within(c)
        assert net.counters().dropped["partition"] == 2

        net.heal(cut)
        await a.send_to(b"healed", b.local_address)
        assert await receive(b) == [(b"healed", a.local_address)]


async def test_a_partition_drops_datagrams_already_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        a_host = net.add_host("198.51.100.1", LinkConfig(latency_s=1.0))
        b_host = net.add_host("198.51.100.2")
        a, b = a_host.bind(1), b_host.bind(2)
        await a.send_to(b"in flight", b.local_address)
        await trio.sleep(0.5)
        net.partition([a_host], [b_host])
        assert not await arrives_within(b, 2.0)
        net.heal()
        await a.send_to(b"after heal", b.local_address)
        assert await arrives_within(b, 2.0)


async def test_a_nat_in_a_partition_group_stands_for_the_hosts_behind_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        server_host = net.add_host("198.51.100.1")
        server = server_host.bind(3478)
        nat = net.add_nat("203.0.113.1", NatConfig())
        client = nat.add_host("192.168.1.10").bind(5000)
        net.partition([nat], [server_host])
        await client.send_to(b"blocked", server.local_address)
        assert not await arrives_within(server)
        net.heal()
        await client.send_to(b"open", server.local_address)
        assert await arrives_within(server)
