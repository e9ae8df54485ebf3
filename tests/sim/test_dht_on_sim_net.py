"""The Kademlia DHT of real ``Node``s on sim_net, in virtual time, at scale and under attack.

Every path has 50 ms one-way latency and 2% loss (see :data:`dht_cluster.ACCESS_LINK`); every
network, identity and node RNG is seeded, and ``conftest.py`` seeds trio's scheduler.
"""

from __future__ import annotations

import hashlib
import logging
import random

import pytest
import trio
import trio.testing

from lattica.dht import (
    PROTOCOL_ID,
    BootstrapError,
    DhtConfig,
    SignedRecord,
    record_key,
    sign_record,
    validate_record,
    xor_distance,
)
from lattica.dht.messages import (
    Ack,
    FindNode,
    GetProviders,
    GetValue,
    Nodes,
    PeerInfo,
    Ping,
    Pong,
    Providers,
    PutValue,
    Request,
    Response,
    Value,
    decode_request,
    decode_response,
    encode_message,
)
from lattica.identity import Identity, PeerId
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Network

from .dht_cluster import FAST_DHT, PORT, DhtCluster, identity, peer_addr, wall_clock

KEY = b"profile"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def value_of(writer: int) -> bytes:
    return b"value written by node %d" % writer


async def run_all(*calls: object) -> None:
    """Run ``(async_fn, *args)`` tuples concurrently and wait for all of them."""
    async with trio.open_nursery() as nursery:
        for fn, *args in calls:  # type: ignore[misc]
            nursery.start_soon(fn, *args)


async def start_network(cluster: DhtCluster, seeds: list[int]) -> None:
    """The first seed starts alone, the other seeds join through it, then everyone else joins
    through the seeds (all at once) and the call returns once every node has joined."""
    await cluster.start(seeds[0])
    await cluster.start_all(seeds[1:], seeds=seeds[:1])
    await cluster.start_all([i for i in range(cluster.size) if i not in seeds], seeds=seeds)


async def put_records(cluster: DhtCluster, writers: list[int]) -> dict[int, int]:
    acks: dict[int, int] = {}

    async def put(writer: int) -> None:
        acks[writer] = (await cluster.nodes[writer].dht.put(KEY, value_of(writer))).acks

    await run_all(*[(put, w) for w in writers])
    return acks


def is_genuine(record: SignedRecord | None, writer: int) -> bool:
    if record is None or record.writer != identity(writer).peer_id.key or record.value != value_of(writer):
        return False
    validate_record(
        record,
        now=wall_clock(),
        max_ttl_s=FAST_DHT.max_record_ttl_s,
        expected_dht_key=record_key(identity(writer).peer_id, KEY),
    )
    return True


async def test_two_hundred_nodes_every_get_finds_the_right_value(autojump_clock: trio.testing.MockClock) -> None:
    rng = random.Random(101)
    async with Network(seed=101) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, 200)
        await start_network(cluster, seeds=[0, 1, 2])
        assert all(len(node.dht.routing_table) >= FAST_DHT.k for node in cluster.nodes.values())

        writers = rng.sample(range(200), 50)
        acks = await put_records(cluster, writers)
        # Every put reached the k closest nodes despite the loss.
        assert sorted(acks.values()) == [FAST_DHT.k] * 50

        readers = rng.sample(range(200), 100)
        found: list[tuple[int, int, SignedRecord | None]] = []

        async def get(reader: int, writer: int) -> None:
            found.append((reader, writer, (await cluster.nodes[reader].dht.get(KEY, identity(writer).peer_id)).record))

        # Each of the 50 records is read by two different random readers.
        await run_all(*[(get, r, writers[i % 50]) for i, r in enumerate(readers)])
        assert len(found) == 100
        failed = [(r, w) for r, w, record in found if not is_genuine(record, w)]
        assert failed == []
        assert net.counters().dropped["loss"] > 0  # the loss really happened
        nursery.cancel_scope.cancel()


# Maintenance every 10 s and own records republished every minute, so churn and republishing
# fit in a few minutes of virtual time.
CHURN_DHT = DhtConfig(**{**vars(FAST_DHT), "maintenance_interval_s": 10.0, "record_republish_interval_s": 60.0})


async def test_gets_succeed_through_twenty_percent_churn_and_republish_restores_a_lost_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    size, rng = 100, random.Random(202)
    async with Network(seed=202) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, size, dht_config=CHURN_DHT)
        await start_network(cluster, seeds=[0, 1, 2])
        writers = rng.sample(range(size), 20)
        acks = await put_records(cluster, writers)
        assert sorted(acks.values()) == [CHURN_DHT.k] * 20
        put_at = trio.current_time()

        # The churn takes every node holding one writer's record (the worst case for that record)
        # and random others, 20% of the network in all, one every 1.5 s.
        orphan = writers[0]
        orphan_key = record_key(identity(orphan).peer_id, KEY)

        def holders_of_orphan() -> list[int]:
            return [
                i
                for i, node in cluster.nodes.items()
                if i != orphan and node.dht_store.get_record(orphan_key, now=wall_clock()) is not None
            ]

        holders = holders_of_orphan()
        assert 0 < len(holders) <= size // 5
        others = [i for i in range(size) if i not in holders and i != orphan]
        doomed = holders + rng.sample(others, size // 5 - len(holders))
        rng.shuffle(doomed)
        survivors = [i for i in range(size) if i not in doomed]
        live_writers = [w for w in writers if w in survivors]
        results: list[tuple[str, int, int, bool]] = []

        async def get(phase: str, reader: int, writer: int) -> None:
            record = (await cluster.nodes[reader].dht.get(KEY, identity(writer).peer_id)).record
            results.append((phase, reader, writer, is_genuine(record, writer)))

        async def churn() -> None:
            for victim in doomed:
                cluster.crash(victim)
                await trio.sleep(1.5)

        async with trio.open_nursery() as gets:
            gets.start_soon(churn)
            # Gets go on during the churn: a new one every 0.5 s, by a node that stays up, for a
            # record whose writer stays up (the orphaned record is checked after the churn).
            for _ in range(len(doomed) * 3):
                writer = rng.choice([w for w in live_writers if w != orphan])
                gets.start_soon(get, "churn", rng.choice(survivors), writer)
                await trio.sleep(0.5)
        assert sorted(cluster.live()) == survivors
        # The churn took every copy of the orphaned record except its writer's own, before any
        # republish was due: from here on only republishing can bring it back.
        assert trio.current_time() < put_at + CHURN_DHT.record_republish_interval_s
        assert holders_of_orphan() == []

        # One republish interval (plus a maintenance round and the republish lookups) later,
        # every live writer's record, the orphaned one included, is found by random live nodes.
        await trio.sleep_until(put_at + CHURN_DHT.record_republish_interval_s + CHURN_DHT.maintenance_interval_s + 20)
        # (Not necessarily on k nodes: the survivors' tables still list the crashed holders as
        # the closest peers, so the republish lookup may converge on fewer live ones.)
        assert len(holders_of_orphan()) >= CHURN_DHT.get_value_count
        await run_all(*[(get, "after", rng.choice(survivors), w) for w in live_writers for _ in range(2)])

        during = [ok for phase, _r, _w, ok in results if phase == "churn"]
        after = [ok for phase, _r, _w, ok in results if phase == "after"]
        assert len(during) == len(doomed) * 3 and all(during)
        assert len(after) == 2 * len(live_writers) and all(after)
        nursery.cancel_scope.cancel()


class Forger:
    """A DHT request handler that lies: it serves a forged record of ``victim``'s key (its value
    changed, its sequence number maxed, its signature garbage), a validly signed record of its
    own wherever another one was asked for, claims to store everything, and answers every
    lookup with itself plus nonexistent peers ground to be closer to ``target`` than any honest
    node, fake ids at honest nodes' addresses and honest ids at its own address."""

    def __init__(self, node: Node, victim: PeerId, target: bytes, honest: list[PeerAddr]) -> None:
        self.node = node
        self.forged = SignedRecord(
            writer=victim.key,
            key=KEY,
            value=b"forged",
            seq=(1 << 63) - 1,
            expires_at=int(wall_clock() + 3600),
            signature=bytes(64),
        )
        self.target = target
        self.misplaced = sign_record(node.identity, KEY, b"forged", seq=1, expires_at=int(wall_clock() + 3600))
        grind = sorted(
            (Identity.from_seed(hashlib.sha256(b"fake-%d" % i).digest()).peer_id for i in range(2048)),
            key=lambda p: xor_distance(p.dht_key(), target),
        )
        self.fakes = grind[:8] + grind[-4:]
        nowhere = [PeerInfo.of(p, [(f"10.0.9.{j + 1}", PORT)]) for j, p in enumerate(grind[:8])]
        wrong_ids = [PeerInfo.of(p, [a.address]) for p, a in zip(grind[-4:], honest[:4], strict=True)]
        poisoned = [PeerInfo.of(a.peer_id, node.listen_addresses()) for a in honest[4:8] if a.peer_id]
        self.closer = [self.me(), *nowhere, *wrong_ids, *poisoned]
        self.served: dict[str, int] = {}

    def me(self) -> PeerInfo:
        return PeerInfo.of(self.node.peer_id, self.node.listen_addresses())

    def answer(self, request: Request) -> Response:
        me, closer = self.me(), self.closer
        match request:
            case Ping():
                return Pong(sender=me)
            case FindNode():
                return Nodes(sender=me, closer=closer)
            case GetValue(key=key):
                return Value(sender=me, record=self.forged if key == self.target else self.misplaced, closer=closer)
            case GetProviders():
                return Providers(sender=me, closer=closer)
            case _:
                return Ack(sender=me, stored=True)

    async def handle(self, peer: PeerId, payload: bytes) -> bytes:
        request = decode_request(payload)
        self.served[type(request).__name__] = self.served.get(type(request).__name__, 0) + 1
        return encode_message(self.answer(request))


@pytest.mark.parametrize("paths", [1, 3], ids=["plain", "disjoint-paths"])
async def test_forged_values_and_lying_closer_peers_do_not_break_lookups(
    autojump_clock: trio.testing.MockClock, paths: int
) -> None:
    size, forger_index, writer = 30, 2, 25
    target = record_key(identity(writer).peer_id, KEY)
    async with Network(seed=303) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, size, dht_config=DhtConfig(**{**vars(FAST_DHT), "disjoint_paths": paths}))
        await cluster.start(0)
        forger_node = await cluster.start(forger_index)
        await cluster.start_all([1], seeds=[0])
        # Everyone bootstraps through the forger among others, so it sits in every routing table.
        forger = Forger(forger_node, identity(writer).peer_id, target, [peer_addr(i) for i in range(3, 11)])
        forger_node.rpc.add_handler(PROTOCOL_ID, forger.handle)
        await cluster.start_all([i for i in range(size) if i not in (0, 1, forger_index)], seeds=[0, 1, forger_index])
        honest = {i: n for i, n in cluster.nodes.items() if i != forger_index}
        # The fake ids are closer to the record than every honest node.
        closest_honest = min(xor_distance(n.peer_id.dht_key(), target) for n in honest.values())
        assert all(xor_distance(f.dht_key(), target) < closest_honest for f in forger.fakes[:8])

        await cluster.nodes[writer].dht.put(KEY, value_of(writer))
        genuine = cluster.nodes[writer].dht_store.get_record(target, now=wall_clock())
        assert genuine is not None

        # The forger also pushes its forgery to every honest node directly.
        refusals: list[Response] = []

        async def push(index: int) -> None:
            message = PutValue(sender=forger.me(), record=forger.forged)
            raw = await forger_node.rpc.request(peer_addr(index), PROTOCOL_ID, encode_message(message), timeout_s=10)
            refusals.append(decode_response(raw))

        found: dict[int, SignedRecord | None] = {}

        async def get(reader: int) -> None:
            found[reader] = (await honest[reader].dht.get(KEY, identity(writer).peer_id)).record

        await run_all(*[(push, i) for i in honest], *[(get, r) for r in honest if r != writer])
        for node in honest.values():
            await node.dht.background_done()  # the gets' lookups and read repairs have ended

        assert forger.served.get("GetValue", 0) > 0  # the lies were told
        assert len(found) == size - 2 and all(record == genuine for record in found.values())
        assert len(refusals) == size - 1
        assert all(isinstance(r, Ack) and not r.stored and r.reason.startswith("invalid") for r in refusals)
        # No honest store holds the forgery; the genuine record is still on at least k nodes.
        held = [n.dht_store.get_record(target, now=wall_clock()) for n in honest.values()]
        assert all(record is None or record == genuine for record in held)
        assert sum(record == genuine for record in held) >= FAST_DHT.k
        # Peers that were only mentioned never enter a routing table.
        assert not any(f in n.dht.routing_table for f in forger.fakes for n in honest.values())
        nursery.cancel_scope.cancel()


class TimedLog(logging.Handler):
    """Keeps (virtual time, message) of every record logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((trio.current_time(), record.getMessage()))


async def test_unreachable_bootstrap_peer_is_named_in_the_error_and_retried_until_it_appears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = TimedLog()
    logging.getLogger("lattica.node").addHandler(log)
    try:
        async with Network(seed=404) as net, trio.open_nursery() as nursery:
            cluster = DhtCluster(net, nursery, 2)  # node 0's host exists, but nothing listens yet
            joiner = await cluster.start(1, bootstrap=[0])
            with pytest.raises(BootstrapError) as info:
                await joiner.dht.bootstrap()
            assert "10.0.0.1:4001" in str(info.value)
            assert trio.current_time() == pytest.approx(FAST_DHT.query_timeout_s)

            await trio.sleep_until(16.0)
            assert not joiner.joined_dht.is_set()
            seed = await cluster.start(0)
            await joiner.joined_dht.wait()
            joined_at = trio.current_time()

            failures = [(t, m) for t, m in log.records if m.startswith("DHT bootstrap failed")]
            assert all("10.0.0.1:4001" in m for _t, m in failures)
            # Each attempt waits one query timeout (2 s), then the retry delay doubles: 1, 2, 4, 8 s.
            assert [m.rsplit("retrying in ", 1)[1] for _t, m in failures] == ["1 s", "2 s", "4 s", "8 s"]
            times = [t for t, _m in failures]
            assert times == pytest.approx([2.0, 5.0, 9.0, 15.0])
            # The fifth attempt, 8 s after the fourth failure, finds the seed and joins.
            assert 23.0 < joined_at < 24.0
            assert seed.peer_id in joiner.dht.routing_table and joiner.peer_id in seed.dht.routing_table
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("lattica.node").removeHandler(log)


async def test_find_providers_returns_every_provider_across_a_hundred_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    size, rng = 100, random.Random(505)
    async with Network(seed=505) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, size)
        await start_network(cluster, seeds=[0, 1, 2])
        cids = [hashlib.sha256(b"content %d" % i).digest() for i in range(10)]
        chosen = rng.sample(range(size), 30)
        providers = {cid: chosen[3 * i : 3 * i + 3] for i, cid in enumerate(cids)}
        acks: list[int] = []

        async def provide(index: int, cid: bytes) -> None:
            acks.append((await cluster.nodes[index].dht.provide(cid)).acks)

        await run_all(*[(provide, p, cid) for cid, ps in providers.items() for p in ps])
        assert acks == [FAST_DHT.k] * 30

        finders = rng.sample([i for i in range(size) if i not in chosen], 30)
        results: dict[int, list[tuple[int, list[tuple[str, int]]]]] = {}
        rtts: list[float] = []

        async def find(finder: int, cid: bytes) -> None:
            node = cluster.nodes[finder]
            records = (await node.dht.find_providers(cid)).providers
            results[finder] = sorted((cluster.index_of(r.provider), r.address_list()) for r in records)
            # The providers' addresses were handed to the connection manager: dial by id works.
            rtts.append((await node.ping(records[0].provider_id)).rtt_s)

        await run_all(*[(find, f, cids[i % 10]) for i, f in enumerate(finders)])
        for i, finder in enumerate(finders):
            expected = sorted((p, [peer_addr(p).address]) for p in providers[cids[i % 10]])
            assert results[finder] == expected
        assert len(rtts) == 30 and min(rtts) >= 0.1 - 1e-9
        nursery.cancel_scope.cancel()


async def test_a_stopped_peer_costs_one_query_timeout_and_then_leaves_every_routing_table(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=606) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, 3)
        await start_network(cluster, seeds=[0])
        gone = cluster.nodes[2].peer_id
        cluster.crash(2)
        cid = hashlib.sha256(b"content").digest()
        took: dict[str, list[float]] = {}

        async def timed(name: str, fn: object, *args: object) -> None:
            started = trio.current_time()
            await fn(*args)  # type: ignore[operator]
            took.setdefault(name, []).append(trio.current_time() - started)

        for round_ in range(3):
            for index in (0, 1):
                dht = cluster.nodes[index].dht
                await timed(f"put {index}", dht.put, b"key %d" % round_, b"value")
                await timed(f"provide {index}", dht.provide, cid)
                await timed(f"providers {index}", dht.find_providers, cid)
        # Each live node waits for the dead peer once (its first request to it times out);
        # after that its lookups skip it, although the other live node may still name it.
        for index in (0, 1):
            first, *rest = took[f"put {index}"]
            assert first >= FAST_DHT.query_timeout_s
            assert all(t < 1.0 for t in rest)
            assert all(t < 1.0 for t in took[f"provide {index}"] + took[f"providers {index}"])
        # A maintenance ping after the failure backoff fails too: the peer is evicted everywhere.
        await trio.sleep(FAST_DHT.failure_backoff_s + 2 * FAST_DHT.maintenance_interval_s)
        assert all(gone not in node.dht.routing_table for node in cluster.nodes.values())
        nursery.cancel_scope.cancel()


async def test_a_peer_that_restarts_is_not_evicted_by_lookups_that_ran_while_it_was_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=707) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, 5)
        await start_network(cluster, seeds=[0])
        node = cluster.nodes[0]
        restarting = cluster.nodes[4].peer_id
        cluster.crash(4)
        # Two lookups overlap the outage (both wait on the peer at once), then a third runs.
        await run_all((node.dht.get, b"absent 1"), (node.dht.get, b"absent 2"))
        await node.dht.get(b"absent 3")
        assert restarting in node.dht.routing_table
        cluster.hosts[4].set_link(cluster.link)
        await cluster.start(4)
        # The maintenance ping after the backoff finds it up again: it stays.
        await trio.sleep(FAST_DHT.failure_backoff_s + 2 * FAST_DHT.maintenance_interval_s)
        assert restarting in node.dht.routing_table
        found = (await node.dht.get(b"absent 4")).record
        assert found is None and restarting in node.dht.routing_table
        nursery.cancel_scope.cancel()
