"""sim_net links: delay, loss, bursts, bandwidth, queues, MTU, duplication and reordering
show the configured figures over many datagrams, in virtual time."""

from __future__ import annotations

import statistics

import pytest
import trio
import trio.testing

from sim_net import (
    UDP_IPV4_OVERHEAD_BYTES,
    Address,
    GilbertElliott,
    LinkConfig,
    Network,
    SimSocket,
)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def receive(sock: SimSocket, max_datagrams: int = 64) -> list[tuple[bytes, Address]]:
    # A bound in virtual time turns "never arrives" into a failure instead of a hang.
    with trio.fail_after(10):
        return await sock.receive_batch(max_datagrams)


async def drain(sock: SimSocket, quiet_s: float = 5.0) -> list[tuple[bytes, float]]:
    """Everything that arrives until ``quiet_s`` passes with nothing new: (payload, time)."""
    received: list[tuple[bytes, float]] = []
    while True:
        with trio.move_on_after(quiet_s) as scope:
            batch = await sock.receive_batch(max_datagrams=100_000)
        if scope.cancelled_caught:
            return received
        received.extend((data, trio.current_time()) for data, _ in batch)


async def send_numbered(sock: SimSocket, to: SimSocket, count: int, gap_s: float = 0.0) -> None:
    for seq in range(count):
        await sock.send_to(seq.to_bytes(4, "big"), to.local_address)
        if gap_s:
            await trio.sleep(gap_s)


def numbers(received: list[tuple[bytes, float]]) -> list[int]:
    return [int.from_bytes(data[:4], "big") for data, _ in received]


async def test_one_way_delay_is_exactly_the_sum_of_the_access_link_latencies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        a = net.add_host("198.51.100.1", LinkConfig(latency_s=0.025)).bind(1)
        b = net.add_host("198.51.100.2", LinkConfig(latency_s=0.010)).bind(2)
        sent_at = trio.current_time()
        await a.send_to(b"ping", b.local_address)
        await receive(b)
        assert trio.current_time() - sent_at == pytest.approx(0.035, abs=1e-9)
        await b.send_to(b"pong", a.local_address)
        await receive(a)
        assert trio.current_time() - sent_at == pytest.approx(0.070, abs=1e-9)


async def test_asymmetric_access_link_delays_each_direction_separately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        slow_down = net.add_host("198.51.100.1", up=LinkConfig(latency_s=0.01), down=LinkConfig(latency_s=0.2)).bind(1)
        other = net.add_host("198.51.100.2").bind(2)
        start = trio.current_time()
        await slow_down.send_to(b"up", other.local_address)
        await receive(other)
        assert trio.current_time() - start == pytest.approx(0.01)
        await other.send_to(b"down", slow_down.local_address)
        await receive(slow_down)
        assert trio.current_time() - start == pytest.approx(0.21)


async def test_set_path_replaces_the_access_links_between_two_hosts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=1) as net:
        slow = LinkConfig(latency_s=0.1)
        a_host = net.add_host("198.51.100.1", slow)
        b_host = net.add_host("198.51.100.2", slow)
        c = net.add_host("198.51.100.3", slow).bind(3)
        a, b = a_host.bind(1), b_host.bind(2)
        net.set_path(a_host, b_host, LinkConfig(latency_s=0.001))
        start = trio.current_time()
        await a.send_to(b"fast path", b.local_address)
        await a.send_to(b"access links", c.local_address)
        await receive(b)
        assert trio.current_time() - start == pytest.approx(0.001)
        await receive(c)
        assert trio.current_time() - start == pytest.approx(0.2)


async def test_bernoulli_loss_matches_the_configured_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=11) as net:
        a_host = net.add_host("198.51.100.1", LinkConfig(loss=0.1))
        a = a_host.bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        await send_numbered(a, b, 10_000)
        received = await drain(b)
        measured_loss = 1 - len(received) / 10_000
        assert measured_loss == pytest.approx(0.1, abs=0.015)
        lost = a_host.link.up.counters.dropped["loss"]
        assert lost == 10_000 - len(received)
        assert a_host.counters.dropped["loss"] == lost
        assert net.counters().dropped["loss"] == lost


def loss_runs(received_numbers: list[int], sent: int) -> list[int]:
    """Lengths of the runs of consecutive lost datagrams."""
    got = set(received_numbers)
    runs: list[int] = []
    current = 0
    for seq in range(sent):
        if seq in got:
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    if current:
        runs.append(current)
    return runs


async def test_gilbert_elliott_loss_comes_in_bursts_with_the_expected_mean(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bursts = GilbertElliott(p_good_to_bad=0.01, p_bad_to_good=0.2, loss_good=0.0, loss_bad=1.0)
    sent = 20_000
    async with Network(seed=12) as net:
        bursty = net.add_host("198.51.100.1", LinkConfig(burst_loss=bursts)).bind(1)
        uniform = net.add_host("198.51.100.2", LinkConfig(loss=bursts.mean_loss)).bind(2)
        sink_b = net.add_host("198.51.100.3").bind(3)
        sink_u = net.add_host("198.51.100.4").bind(4)
        await send_numbered(bursty, sink_b, sent)
        await send_numbered(uniform, sink_u, sent)
        bursty_runs = loss_runs(numbers(await drain(sink_b)), sent)
        uniform_runs = loss_runs(numbers(await drain(sink_u)), sent)

    assert sum(bursty_runs) / sent == pytest.approx(bursts.mean_loss, abs=0.015)
    # Bad-state bursts last 1 / p_bad_to_good = 5 datagrams on average; independent losses at
    # the same mean rate almost never come two in a row.
    assert statistics.mean(bursty_runs) == pytest.approx(5.0, rel=0.25)
    assert statistics.mean(uniform_runs) < 1.2


async def test_jitter_spreads_delays_within_bounds_without_reordering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=13) as net:
        a = net.add_host("198.51.100.1", LinkConfig(latency_s=0.05, jitter_s=0.02)).bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        # Sent closer together than the jitter, so independent delays would reorder them.
        count, gap = 1000, 0.005
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_numbered, a, b, count, gap)
            received = await drain(b)
    delays = [at - (start + seq * gap) for seq, (_, at) in zip(numbers(received), received, strict=True)]
    assert numbers(received) == list(range(count))
    assert min(delays) >= 0.05 - 1e-9
    assert max(delays) <= 0.07 + 1e-9
    assert statistics.stdev(delays) > 0.002


async def test_bandwidth_limits_delivery_to_the_serialisation_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate_bps = 1_000_000
    payload = 1000
    count = 100
    async with Network(seed=14) as net:
        link = LinkConfig(bandwidth_bps=rate_bps, queue_bytes=1_000_000)
        a = net.add_host("198.51.100.1", link).bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        start = trio.current_time()
        for _ in range(count):
            await a.send_to(bytes(payload), b.local_address)
        received = await drain(b)
    wire_bits = (payload + UDP_IPV4_OVERHEAD_BYTES) * 8
    assert len(received) == count
    assert received[0][1] - start == pytest.approx(wire_bits / rate_bps)
    assert received[-1][1] - start == pytest.approx(count * wire_bits / rate_bps)


async def test_a_full_queue_tail_drops_and_counts_the_excess(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=15) as net:
        link = LinkConfig(bandwidth_bps=1_000_000, queue_bytes=10_000)
        a_host = net.add_host("198.51.100.1", link)
        a = a_host.bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        for _ in range(100):
            await a.send_to(bytes(1000), b.local_address)
        received = await drain(b)
    fits = 10_000 // (1000 + UDP_IPV4_OVERHEAD_BYTES)
    assert len(received) == fits
    assert a_host.link.up.counters.dropped["queue"] == 100 - fits
    assert net.counters().dropped["queue"] == 100 - fits


async def test_datagrams_larger_than_the_mtu_are_dropped_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=16) as net:
        a_host = net.add_host("198.51.100.1", LinkConfig(mtu_bytes=1500))
        a = a_host.bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        largest = 1500 - UDP_IPV4_OVERHEAD_BYTES
        await a.send_to(bytes(largest), b.local_address)
        await a.send_to(bytes(largest + 1), b.local_address)
        received = await drain(b)
    assert [len(data) for data, _ in received] == [largest]
    assert a_host.link.up.counters.dropped["mtu"] == 1


async def test_duplication_delivers_extra_copies_at_the_configured_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=17) as net:
        a_host = net.add_host("198.51.100.1", LinkConfig(duplicate=0.1))
        a = a_host.bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        await send_numbered(a, b, 10_000)
        received = numbers(await drain(b))
    extra = len(received) - 10_000
    assert extra / 10_000 == pytest.approx(0.1, abs=0.015)
    assert extra == a_host.link.up.counters.duplicated == net.counters().duplicated
    assert set(received) == set(range(10_000))


async def test_reordering_lets_later_datagrams_overtake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    count = 2000
    async with Network(seed=18) as net:
        config = LinkConfig(latency_s=0.02, reorder=0.1, reorder_delay_s=0.01)
        a_host = net.add_host("198.51.100.1", config)
        a = a_host.bind(1)
        b = net.add_host("198.51.100.2").bind(2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_numbered, a, b, count, 0.001)
            received = numbers(await drain(b))
    assert sorted(received) == list(range(count))
    highest = -1
    overtaken = 0
    for seq in received:
        if seq < highest:
            overtaken += 1
        highest = max(highest, seq)
    reordered = a_host.link.up.counters.reordered
    assert reordered / count == pytest.approx(0.1, abs=0.02)
    # Every delayed datagram is overtaken by the ~10 sent during its extra delay.
    assert overtaken == reordered


async def test_a_full_socket_buffer_drops_and_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=19) as net:
        a = net.add_host("198.51.100.1").bind(1)
        b_host = net.add_host("198.51.100.2")
        b = b_host.bind(2, receive_buffer_bytes=3000)
        for _ in range(5):
            await a.send_to(bytes(1000), b.local_address)
        received = await drain(b)
    assert len(received) == 3
    assert net.counters().dropped["socket_buffer"] == 2
    assert b_host.counters.received == 3
