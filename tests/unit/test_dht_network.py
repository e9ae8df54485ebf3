"""The DHT service on a 50-node in-memory network (deterministic seeds, virtual time)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import pytest
import trio
import trio.testing

from lattica.dht import (
    BootstrapError,
    Dht,
    DhtConfig,
    DhtStore,
    GetResult,
    PeerResult,
    QuorumError,
    RecordTooLargeError,
    bucket_index,
    record_key,
    sign_record,
    xor_distance,
)
from lattica.dht.messages import PROTOCOL_ID, Ack, PeerInfo, Ping, PutValue, decode_response, encode_message
from lattica.dht.results import Replication
from lattica.dht.testing import MemoryNetwork, MemoryTransport
from lattica.errors import LocalProtocolError
from lattica.identity import Identity
from lattica.net.address import PeerAddr
from lattica.net.datagram import Address

WALL_EPOCH = 1_750_000_000.0


def wall_clock() -> float:
    return WALL_EPOCH + trio.current_time()


@dataclass
class SimNode:
    identity: Identity
    address: Address
    transport: MemoryTransport
    store: DhtStore
    dht: Dht

    @property
    def peer_addr(self) -> PeerAddr:
        return PeerAddr(self.address, self.identity.peer_id)


def make_node(
    net: MemoryNetwork,
    index: int,
    config: DhtConfig | None = None,
    store: DhtStore | None = None,
    clock: Callable[[], float] = wall_clock,
) -> SimNode:
    identity = Identity.from_seed(bytes([index + 1]) * 32)
    address = (f"198.18.{index // 200}.{index % 200 + 1}", 4000)
    transport = net.transport(identity.peer_id, [address])
    store = store or DhtStore(":memory:", own_key=identity.peer_id.dht_key())
    dht = Dht(
        identity,
        transport,
        store,
        remember_addresses=transport.add_addresses,
        own_addresses=lambda: [address],
        config=config or DhtConfig(),
        wall_clock=clock,
        rng=random.Random(index),
    )
    return SimNode(identity, address, transport, store, dht)


async def start_network(
    nursery: trio.Nursery, size: int, config: DhtConfig | None = None
) -> tuple[MemoryNetwork, list[SimNode]]:
    net = MemoryNetwork()
    nodes = [make_node(net, i, config) for i in range(size)]
    for node in nodes:
        await nursery.start(node.dht.run)
    for node in nodes[1:]:
        await node.dht.bootstrap([nodes[0].peer_addr])
    return net, nodes


async def test_fifty_nodes_put_get_provide_find(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        _net, nodes = await start_network(nursery, 50)
        assert all(len(n.dht.routing_table) >= 10 for n in nodes)

        acks = (await nodes[7].dht.put(b"model/latest", b"shard-map-v1", ttl_s=3600)).acks
        assert acks >= 15
        record = (await nodes[42].dht.get(b"model/latest", writer=nodes[7].identity.peer_id)).record
        assert record is not None and record.value == b"shard-map-v1"
        assert (await nodes[42].dht.get(b"model/latest")).record is None  # node 42's own namespace

        await nodes[7].dht.put(b"model/latest", b"shard-map-v2", ttl_s=3600)
        for reader in (nodes[3], nodes[29], nodes[49]):
            record = (await reader.dht.get(b"model/latest", writer=nodes[7].identity.peer_id)).record
            assert record is not None and record.value == b"shard-map-v2"

        cid = b"\x12\x20" + bytes(range(32))
        assert (await nodes[11].dht.provide(cid)).acks >= 15
        assert (await nodes[23].dht.provide(cid)).acks >= 15
        providers = (await nodes[35].dht.find_providers(cid)).providers
        assert {p.provider_id for p in providers} == {
            nodes[11].identity.peer_id,
            nodes[23].identity.peer_id,
        }
        assert providers[0].address_list() in ([nodes[11].address], [nodes[23].address])
        # The finder's transport now knows where the providers are.
        assert nodes[35].transport.address_book[nodes[11].identity.peer_id] == [nodes[11].address]

        assert (await nodes[2].dht.find_peer(nodes[48].identity.peer_id)).addresses == [nodes[48].address]
        nursery.cancel_scope.cancel()


async def test_put_fails_without_quorum_and_never_truncates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 6)
        with pytest.raises(RecordTooLargeError):
            await nodes[1].dht.put(b"big", b"x" * (64 * 1024 + 1))
        assert (await nodes[2].dht.get(b"big", writer=nodes[1].identity.peer_id)).record is None
        assert (await nodes[1].dht.put(b"exact", b"x" * (64 * 1024))).acks == 5

        for node in nodes[2:]:
            net.dead.add(node.identity.peer_id)
        with pytest.raises(QuorumError) as info:
            await nodes[1].dht.put(b"k", b"v", quorum=3)
        assert info.value.acks == 1 and info.value.quorum == 3
        nursery.cancel_scope.cancel()


async def test_lone_node_put_raises_quorum_error(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    node = make_node(net, 0)
    with pytest.raises(QuorumError):
        await node.dht.put(b"k", b"v")
    # ...but the record is kept locally (and republished once peers appear).
    assert node.store.get_record(record_key(node.identity.peer_id, b"k"), now=0) is not None


async def test_forged_and_stale_records_are_refused_and_do_not_spread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        _net, nodes = await start_network(nursery, 12)
        writer = nodes[4]
        await writer.dht.put(b"cfg", b"good", ttl_s=3600)
        held = (await nodes[9].dht.get(b"cfg", writer=writer.identity.peer_id)).record
        assert held is not None

        attacker = nodes[5]
        me = PeerInfo.of(attacker.identity.peer_id, [attacker.address])
        # Forged: the attacker signs a record claiming the writer's namespace.
        forged = sign_record(attacker.identity, b"cfg", b"evil", seq=held.seq + 1, expires_at=held.expires_at)
        forged = type(forged)(
            writer=writer.identity.peer_id.key,
            key=forged.key,
            value=forged.value,
            seq=forged.seq,
            expires_at=forged.expires_at,
            signature=forged.signature,
        )
        stale = sign_record(writer.identity, b"cfg", b"old", seq=held.seq - 1, expires_at=held.expires_at)
        for victim in nodes:
            if victim is attacker:
                continue
            for bad, reason in ((forged, "invalid"), (stale, "stale")):
                raw = await attacker.transport.request(
                    victim.identity.peer_id
                    if victim.identity.peer_id in attacker.transport.address_book
                    else victim.peer_addr,
                    PROTOCOL_ID,
                    encode_message(PutValue(sender=me, record=bad)),
                )
                ack = decode_response(raw)
                assert isinstance(ack, Ack) and not ack.stored and ack.reason.startswith(reason)
        for reader in nodes:
            record = (await reader.dht.get(b"cfg", writer=writer.identity.peer_id)).record
            assert record is not None and record.value == b"good"
        nursery.cancel_scope.cancel()


async def test_client_mode_node_is_not_added_to_tables(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 8)
        client = make_node(net, 100, DhtConfig(client_mode=True))
        await nursery.start(client.dht.run)
        await client.dht.bootstrap([nodes[0].peer_addr])
        assert len(client.dht.routing_table) == 8
        assert all(client.identity.peer_id not in n.dht.routing_table for n in nodes)
        assert (await client.dht.put(b"k", b"from a client")).acks >= 1
        found = (await nodes[3].dht.get(b"k", writer=client.identity.peer_id)).record
        assert found is not None and found.value == b"from a client"
        nursery.cancel_scope.cancel()


async def test_a_peer_reached_through_a_relay_is_neither_remembered_nor_tabled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # It runs in server mode and claims its (private) listen address; the nodes it talks to see
    # it only through a relay, so that address is not believed, stored or handed out.
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 8)
        nated = make_node(net, 100)
        net.relayed.add(nated.identity.peer_id)
        await nursery.start(nated.dht.run)
        await nated.dht.bootstrap([nodes[0].peer_addr])
        assert len(nated.dht.routing_table) == 8
        assert all(nated.identity.peer_id not in n.dht.routing_table for n in nodes)
        assert all(nated.identity.peer_id not in n.transport.address_book for n in nodes)
        assert (await nodes[2].dht.find_peer(nated.identity.peer_id)).addresses is None
        nursery.cancel_scope.cancel()


async def test_bootstrap_with_no_reachable_peer_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    node = make_node(net, 0)
    with pytest.raises(BootstrapError, match="none of the 1 bootstrap"):
        await node.dht.bootstrap([PeerAddr(("198.18.9.9", 1))])


async def test_bootstrap_by_address_only_learns_and_verifies_the_peer_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    a, b = make_node(net, 0), make_node(net, 1)
    assert await b.dht.bootstrap([PeerAddr(a.address)]) == 1
    assert a.identity.peer_id in b.dht.routing_table
    assert b.identity.peer_id in a.dht.routing_table


async def test_dead_peers_are_evicted_and_table_rebootstraps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = DhtConfig(maintenance_interval_s=60, max_failures=1)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 5, config)
        lonely = nodes[4]
        for node in nodes[:4]:
            net.dead.add(node.identity.peer_id)
        await lonely.dht.refresh(all_buckets=True)
        await lonely.dht.find_peer(nodes[0].identity.peer_id)
        assert len(lonely.dht.routing_table) == 0
        net.dead.clear()
        await trio.sleep(61)  # one maintenance round re-bootstraps from remembered peers
        assert len(lonely.dht.routing_table) == 4
        nursery.cancel_scope.cancel()


async def test_provider_records_are_republished_before_they_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = DhtConfig(maintenance_interval_s=600)
    async with trio.open_nursery() as nursery:
        _net, nodes = await start_network(nursery, 10, config)
        cid = b"cid-1"
        await nodes[1].dht.provide(cid)
        await trio.sleep(47 * 3600)
        providers = (await nodes[8].dht.find_providers(cid)).providers
        assert [p.provider_id for p in providers] == [nodes[1].identity.peer_id]
        assert providers[0].expires_at > wall_clock() + 20 * 3600  # re-signed at ~22 h and ~44 h
        await nodes[1].dht.stop_providing(cid)
        await trio.sleep(49 * 3600)
        assert (await nodes[8].dht.find_providers(cid)).providers == []
        nursery.cancel_scope.cancel()


async def test_routing_table_survives_restart(autojump_clock: trio.testing.MockClock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "lattica.db"
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 6)
        identity = nodes[5].identity
        store = DhtStore(db, own_key=identity.peer_id.dht_key())
        net2 = net
        restarted = make_node(net2, 5, store=store)
        await restarted.dht.bootstrap([nodes[0].peer_addr])
        await restarted.dht.put(b"k", b"persisted")
        await restarted.dht.persist_routing_table()
        snapshot = {e.peer_id for e in restarted.dht.routing_table_snapshot()}
        store.close()

        again = make_node(net2, 5, store=DhtStore(db, own_key=identity.peer_id.dht_key()))
        assert {e.peer_id for e in again.dht.routing_table_snapshot()} == snapshot
        record = (await again.dht.get(b"k")).record
        assert record is not None and record.value == b"persisted"
        again.store.close()
        nursery.cancel_scope.cancel()


def far_pair(net: MemoryNetwork, config: DhtConfig) -> tuple[SimNode, SimNode, SimNode]:
    """Node A plus two nodes that fall in the same (far) bucket of A."""
    a = make_node(net, 0, config)
    same_bucket = []
    for i in range(1, 200):
        identity = Identity.from_seed(bytes([i + 1]) * 32)
        if bucket_index(a.identity.peer_id.dht_key(), identity.peer_id.dht_key()) == 255:
            same_bucket.append(i)
        if len(same_bucket) == 2:
            break
    return a, make_node(net, same_bucket[0], config), make_node(net, same_bucket[1], config)


async def ping(src: SimNode, dst: SimNode) -> None:
    me = PeerInfo.of(src.identity.peer_id, [src.address])
    await src.transport.request(dst.peer_addr, PROTOCOL_ID, encode_message(Ping(sender=me)))


@pytest.mark.parametrize("old_peer_alive", [True, False])
async def test_full_bucket_keeps_live_old_peer_and_evicts_dead_one(
    autojump_clock: trio.testing.MockClock, old_peer_alive: bool
) -> None:
    net = MemoryNetwork()
    a, old, newcomer = far_pair(net, DhtConfig(k=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.dht.run)
        await ping(old, a)
        assert old.identity.peer_id in a.dht.routing_table
        if not old_peer_alive:
            net.dead.add(old.identity.peer_id)
        await ping(newcomer, a)
        await trio.sleep(30)  # the liveness check runs (and times out) in the background
        table = a.dht.routing_table
        assert (old.identity.peer_id in table) == old_peer_alive
        assert (newcomer.identity.peer_id in table) == (not old_peer_alive)
        nursery.cancel_scope.cancel()


async def test_a_mass_join_leaves_no_bucket_empty_where_nodes_exist(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Everyone joins at once through three seeds, with k small enough that groups of ids fill
    # their own lookups: without the join's empty-bucket fill, such groups stay strangers.
    config = DhtConfig(k=4, alpha=2, maintenance_interval_s=60)
    net = MemoryNetwork(latency_s=0.05)
    nodes = [make_node(net, i, config) for i in range(150)]
    keys = [int.from_bytes(n.identity.peer_id.dht_key(), "big") for n in nodes]

    def holes() -> list[tuple[str, int]]:
        """(node, live nodes in the range) for every empty bucket whose range is not empty."""
        found = []
        for node in nodes:
            for low, high in node.dht.routing_table.empty_far_buckets():
                living = sum(1 for k in keys if low <= k <= high)
                if living:
                    found.append((node.identity.peer_id.short(), living))
        return found

    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.dht.run)
        seeds = [n.peer_addr for n in nodes[:3]]
        for node in nodes[1:3]:
            await node.dht.bootstrap(seeds[:1])
        async with trio.open_nursery() as joins:
            for node in nodes[3:]:
                joins.start_soon(node.dht.bootstrap, seeds)
        # The scenario does what it is meant to: some groups missed each other while joining.
        assert holes() != []
        # Buckets still empty are retried 60 s after the join, then 120 s later, ...; the groups
        # that missed each other are all connected within two maintenance rounds.
        await trio.sleep(2 * 60 + 1)
        assert holes() == []
        nursery.cancel_scope.cancel()


async def test_get_answers_at_its_quorum_and_repairs_older_copies_in_the_background(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Dead peers stay in routing tables (no eviction) and are not skipped once back, so the reads
    # below ask the stale holders.
    config = DhtConfig(get_value_count=30, max_failures=1000, failure_backoff_s=0)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 30, config)
        writer = nodes[3]
        key = record_key(writer.identity.peer_id, b"cfg")

        def value_at(node: SimNode) -> bytes | None:
            record = node.store.get_record(key, now=wall_clock())
            return None if record is None else record.value

        async def put_missing(value: bytes, missed_by: list[SimNode]) -> None:
            net.dead.update(n.identity.peer_id for n in missed_by)
            await writer.dht.put(b"cfg", value, ttl_s=3600)
            net.dead.clear()

        async def get(reader: SimNode, quorum: int | None = None) -> bytes | None:
            record = (await reader.dht.get(b"cfg", writer=writer.identity.peer_id, quorum=quorum)).record
            return None if record is None else record.value

        await writer.dht.put(b"cfg", b"v1", ttl_s=3600)
        holders = [n for n in nodes if n is not writer and value_at(n) == b"v1"]
        # The five holders closest to the key (asked first by every lookup) miss the update.
        stale = sorted(holders, key=lambda n: xor_distance(n.identity.peer_id.dht_key(), key))[:5]
        await put_missing(b"v2", stale)
        assert [value_at(n) for n in stale] == [b"v1"] * 5
        readers = [n for n in nodes if n is not writer and value_at(n) is None]

        # A quorum as large as the holder set sees the newest version, whatever answers first...
        assert await get(readers[0], quorum=len(holders)) == b"v2"
        await readers[0].dht.background_done()
        # ... and every holder that answered with v1 has been sent v2.
        assert [value_at(n) for n in stale] == [b"v2"] * 5

        # A holder answers from its own copy at once, stale or not, and then updates it.
        await put_missing(b"v3", stale)
        assert await get(stale[0]) == b"v2"
        await stale[0].dht.background_done()
        assert [value_at(n) for n in stale] == [b"v3"] * 5

        # Quorum 1 answers at the first record; the lookup goes on after the answer.
        net.latency_s = 0.05
        assert await get(readers[1], quorum=1) == b"v3"
        requests_at_answer = net.requests
        await readers[1].dht.background_done()
        assert net.requests > requests_at_answer

        with pytest.raises(LocalProtocolError):
            await get(readers[1], quorum=0)
        nursery.cancel_scope.cancel()


async def test_a_new_peer_is_on_disk_seconds_after_it_joined_the_table(
    autojump_clock: trio.testing.MockClock,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    db = tmp_path / "lattica.db"
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 3)
        own_key = Identity.from_seed(bytes([10 + 1]) * 32).peer_id.dht_key()  # make_node's identity
        node = make_node(net, 10, store=DhtStore(db, own_key=own_key))
        await nursery.start(node.dht.run)
        await node.dht.bootstrap([nodes[0].peer_addr])  # the join itself saves the table
        newcomer = make_node(net, 11)
        await nursery.start(newcomer.dht.run)
        await newcomer.dht.bootstrap([node.peer_addr])
        assert newcomer.identity.peer_id in node.dht.routing_table

        def on_disk() -> set[object]:
            # What a restart after kill -9 would load: a second connection reads the file.
            reader = DhtStore(db, own_key=own_key)
            try:
                return {p.peer_id for p in reader.load_peers()}
            finally:
                reader.close()

        assert newcomer.identity.peer_id not in on_disk()
        await trio.sleep(DhtConfig().table_save_delay_s + 0.1)  # well before a maintenance round
        assert newcomer.identity.peer_id in on_disk()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("by_id", [True, False], ids=["own-id", "own-address-only"])
async def test_bootstrap_through_our_own_address_fails_and_says_so(
    autojump_clock: trio.testing.MockClock, by_id: bool
) -> None:
    net = MemoryNetwork()
    node = make_node(net, 0)
    own = node.peer_addr if by_id else PeerAddr(node.address)
    with pytest.raises(BootstrapError, match="this node itself"):
        await node.dht.bootstrap([own])
    assert len(node.dht.routing_table) == 0
    assert net.requests == 0  # our own address is known as ours: never dialled


async def test_an_address_that_answers_as_ourselves_does_not_count_as_a_bootstrap_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    node = make_node(net, 0)
    net.listeners[("198.18.0.200", 4000)] = node.identity.peer_id  # e.g. a wildcard listen address
    with pytest.raises(BootstrapError, match="this node itself"):
        await node.dht.bootstrap([PeerAddr(("198.18.0.200", 4000))])
    other = make_node(net, 1)
    with pytest.raises(BootstrapError, match="1 of them this node itself"):
        net.dead.add(other.identity.peer_id)
        await node.dht.bootstrap([PeerAddr(("198.18.0.200", 4000)), other.peer_addr])
    assert len(node.dht.routing_table) == 0


async def test_a_writer_that_lost_its_database_and_runs_an_hour_behind_can_still_publish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 12)
        writer = nodes[4]
        await writer.dht.put(b"cfg", b"v1", ttl_s=3600)
        v1 = writer.store.get_record(record_key(writer.identity.peer_id, b"cfg"), now=wall_clock())
        assert v1 is not None

        # The writer comes back with an empty database and a clock one hour behind: the
        # sequence number it would pick (unix ms) is lower than the one every holder keeps.
        reborn = make_node(net, 4, clock=lambda: wall_clock() - 3600)
        await nursery.start(reborn.dht.run)
        await reborn.dht.bootstrap([nodes[0].peer_addr])
        assert (await reborn.dht.put(b"cfg", b"v2", ttl_s=7200)).acks >= 5
        record = (await nodes[9].dht.get(b"cfg", writer=writer.identity.peer_id)).record
        assert record is not None and record.value == b"v2" and record.seq == v1.seq + 1
        nursery.cancel_scope.cancel()


async def test_a_put_that_fails_says_whether_holders_refused_it_or_did_not_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 6)
        for node in nodes[2:]:
            net.dead.add(node.identity.peer_id)
        with pytest.raises(QuorumError, match=r"only 1 node\(s\) acknowledged, 3 required; 4 did not answer"):
            await nodes[1].dht.put(b"k", b"v", quorum=3)
        nursery.cancel_scope.cancel()
    lone = make_node(MemoryNetwork(), 0)
    with pytest.raises(QuorumError, match="no DHT peer was found"):
        await lone.dht.put(b"k", b"v")


def test_quorum_error_names_stale_refusals() -> None:
    error = QuorumError("put", 0, 1, asked=3, stale=2, refused=1, reasons=("store full",))
    assert "2 hold a newer version" in str(error) and "1 refused it (store full)" in str(error)


def test_a_refusal_quoting_a_forged_or_foreign_record_does_not_move_the_writers_sequence() -> None:
    writer, other = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
    ours = sign_record(writer, b"cfg", b"v", seq=1000, expires_at=2_000_000_000)
    me = PeerInfo.of(other.peer_id, [])
    forged = msgspec.structs.replace(ours, seq=(1 << 63) - 1)  # signature no longer matches
    foreign = sign_record(other, b"cfg", b"v", seq=5000, expires_at=2_000_000_000)
    genuine = sign_record(writer, b"cfg", b"v", seq=3000, expires_at=2_000_000_000)
    outcome = Replication(asked=3)
    for held in (forged, foreign):
        outcome.count(Ack(sender=me, stored=False, reason="stale: ...", held=held))
    assert outcome.newest_held_seq(ours) is None
    outcome.count(Ack(sender=me, stored=False, reason="stale: ...", held=genuine))
    assert outcome.newest_held_seq(ours) == 3000 and outcome.stale == 3


async def test_overlapping_calls_each_return_their_own_lookup_stats(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 20, DhtConfig(k=5))
        await nodes[1].dht.put(b"a", b"1", ttl_s=3600)
        key = record_key(nodes[1].identity.peer_id, b"a")
        reader = next(n for n in nodes[2:] if n.store.get_record(key, now=wall_clock()) is None)
        results: dict[str, object] = {}

        async def get(name: str, key: bytes) -> None:
            results[name] = await reader.dht.get(key, writer=nodes[1].identity.peer_id)

        async def find(name: str) -> None:
            results[name] = await reader.dht.find_peer(Identity.from_seed(b"\xee" * 32).peer_id)

        net.latency_s = 0.05
        async with trio.open_nursery() as calls:
            calls.start_soon(get, "found", b"a")
            calls.start_soon(get, "missing", b"absent")
            calls.start_soon(find, "nobody")
        found, missing, nobody = results["found"], results["missing"], results["nobody"]
        assert isinstance(found, GetResult) and isinstance(missing, GetResult) and isinstance(nobody, PeerResult)
        assert found.record is not None and missing.record is None and nobody.addresses is None
        assert found.stats is not None and missing.stats is not None and nobody.stats is not None
        # The get that found its record answered at the first copy; the others ran to the end.
        assert found.stats.first_value_hops is not None and missing.stats.first_value_hops is None
        assert found.stats.queries < missing.stats.queries
        # Answered from the local store: no lookup, no stats.
        local = await nodes[1].dht.get(b"a")
        assert local.record is not None and local.stats is None
        nursery.cancel_scope.cancel()


async def test_a_lookup_whose_closest_known_peers_all_left_still_reaches_live_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The holders of a record are exactly the k peers its writer knows closest to its key; when
    # they all leave, the writer's (re)publish lookup must fall back on the next-closest peers it
    # knows, not end with no answer until maintenance has evicted the dead.
    config = DhtConfig(k=5, query_timeout_s=1.0, lookup_timeout_s=30.0)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_network(nursery, 30, config)
        writer = nodes[3]
        target = record_key(writer.identity.peer_id.key, b"after-churn")
        gone = writer.dht.routing_table.closest(target, config.k)
        assert len(gone) == config.k
        net.dead.update(n.peer_id for n in gone)
        put = await writer.dht.put(b"after-churn", b"v", ttl_s=3600)
        assert put.acks >= 1
        nursery.cancel_scope.cancel()
