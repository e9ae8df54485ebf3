"""Replicated spaces on sim_net in virtual time: convergence under loss and partition, delta
sync after a heal, and writers refused by every replica.

Every path has 50 ms one-way latency and 10% loss (two access links of 5.13% each); identities,
the network and node RNGs are seeded (``conftest.py`` seeds trio's scheduler).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec
import pycrdt
import pytest
import trio
import trio.testing

from lattica.crdt import (
    ROOT_MAP,
    EnvelopeKind,
    JoinError,
    NotWriterError,
    SpaceId,
    sign_envelope,
    space_cid,
    yrs_client_id,
)
from lattica.crdt.sync import PROTOCOL_ID, Push, SyncReply, decode_reply, encode_message
from lattica.errors import RpcError
from lattica.identity import Identity, PeerId
from lattica.node import Node
from sim_net import LinkConfig, Network

from .crdt_cluster import NODE_CONFIG, node_config
from .dht_cluster import DhtCluster, identity

# 1 - (1 - 0.0513)**2 = 10% loss per path and direction.
LOSSY_LINK = LinkConfig(latency_s=0.025, loss=0.0513)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def start_cluster(cluster: DhtCluster, size: int) -> list[Node]:
    nodes = [await cluster.start(i) for i in range(size)]
    # Addresses only (no connections): replicas meet as sync partners, as DHT providers would.
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.connections.add_addresses(other.peer_id, other.listen_addresses())
    return nodes


async def wait_until_holding(
    nodes: Sequence[Node], space: SpaceId, totals: dict[int, int], *, timeout_s: float
) -> None:
    """Wait (on change events, in virtual time) until node ``i`` holds ``totals[i]`` envelopes."""

    def done(i: int) -> bool:
        return sum(nodes[i].crdt.info(space).version_vector.values()) >= totals[i]

    with trio.fail_after(timeout_s):
        for i in totals:
            while not done(i):
                await nodes[i].crdt.wait_change(space)


def total_bytes_sent(nodes: Sequence[Node]) -> int:
    return sum(n.crdt.stats.bytes_sent for n in nodes)


async def write_randomly(
    nodes: Sequence[Node],
    writers: Sequence[int],
    space: SpaceId,
    count: int,
    rng: random.Random,
    *,
    value_bytes: int,
    keys: int = 20,
) -> None:
    """``count`` writes by random ``writers`` to ``keys`` shared keys, spread over 10 s: concurrent."""
    async with trio.open_nursery() as nursery:
        for n in range(count):
            writer = rng.choice(writers)
            key = f"k{rng.randrange(keys)}"
            value = {"by": writer, "n": n, "pad": "x" * value_bytes}

            async def write(
                writer: int = writer, key: str = key, value: object = value, at: float = rng.uniform(0, 10)
            ) -> None:
                await trio.sleep(at)
                await nodes[writer].crdt.set(space, key, value)

            nursery.start_soon(write)


async def test_fifty_replicas_converge_after_a_partition_and_the_heal_sends_only_deltas(
    autojump_clock: trio.testing.MockClock,
) -> None:
    size, half = 50, 25
    rng = random.Random(7)
    async with Network(seed=7) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, size, node_config=NODE_CONFIG, link=LOSSY_LINK)
        nodes = await start_cluster(cluster, size)
        owner = nodes[0]
        info = await owner.crdt.create_space("jobs", writers=[n.peer_id for n in nodes[1:]])
        space = info.space_id
        # A document of ~120 KB (30 values of 4 KB) that every joiner fetches once.
        for i in range(30):
            await owner.crdt.set(space, f"model-{i}", {"shard": i, "pad": "x" * 4096})
        # Each joins through the owner and one other replica; the rest is found by peer exchange.
        async with trio.open_nursery() as joins:
            for i, node in enumerate(nodes[1:], start=1):
                peers = [owner.peer_id, nodes[rng.randrange(i)].peer_id]
                joins.start_soon(lambda node=node, peers=peers: node.crdt.join_space(space, peers=peers))

        # Concurrent writes by random writers to 20 shared keys.
        await write_randomly(nodes, range(size), space, 40, rng, value_bytes=100)
        total = 49 + 30 + 40  # the owner's grants and writes, then the concurrent writes
        await wait_until_holding(nodes, space, dict.fromkeys(range(size), total), timeout_s=120)
        doc_bytes = len(owner.crdt.doc(space).get_update())

        side_a, side_b = range(half), range(half, size)
        cut = net.partition(cluster.hosts[:half], cluster.hosts[half:])
        async with trio.open_nursery() as both_sides:
            both_sides.start_soon(lambda: write_randomly(nodes, side_a, space, 20, rng, value_bytes=100))
            both_sides.start_soon(lambda: write_randomly(nodes, side_b, space, 20, rng, value_bytes=100))
        # Within 70 s: each half took 80-92 s to converge while replicas waited out pushes and
        # syncs to the other half (request_timeout_s each); 29-47 s since they do not.
        await wait_until_holding(nodes, space, dict.fromkeys(range(size), total + 20), timeout_s=70)

        sent_before_heal = total_bytes_sent(nodes)
        net.heal(cut)
        await wait_until_holding(nodes, space, dict.fromkeys(range(size), total + 40), timeout_s=300)
        heal_bytes = total_bytes_sent(nodes) - sent_before_heal

        states = [n.crdt.get(space) for n in nodes]
        assert all(state == states[0] for state in states)
        updates = [n.crdt.doc(space).get_update() for n in nodes]
        assert all(pycrdt.get_state(u) == pycrdt.get_state(updates[0]) for u in updates)
        assert len({str(n.crdt.info(space).version_vector) for n in nodes}) == 1

        # What the heal had to move at least: each half lacks the other's 20 small envelopes.
        log = owner.crdt.replica(space).log
        small = [e.wire_size() for held in log.values() for e in held.values() if len(e.body) < 1000]
        envelope_bytes = max(small)
        assert envelope_bytes < 400
        missing_deliveries = 2 * half * 20
        # Measured (seed 7): a 127 KB document, 1,000 missing deliveries of <= 324 B, 862 KB
        # sent after the heal (gossip duplicates and version-vector exchanges included).
        # Proportional to the missing updates ...
        assert heal_bytes < 5 * missing_deliveries * envelope_bytes
        # ... and nowhere near shipping the document to the replicas of even one half.
        assert heal_bytes < half * doc_bytes / 2
        nursery.cancel_scope.cancel()


async def push_only_space(cluster: DhtCluster, size: int, name: str) -> tuple[list[Node], SpaceId]:
    """``size`` nodes replicating one space of node 0's, every replica a push target and
    anti-entropy out of the way (only pushes deliver); the cluster must use PUSH_ONLY."""
    nodes = await start_cluster(cluster, size)
    space = (await nodes[0].crdt.create_space(name)).space_id
    for node in nodes[1:]:
        await node.crdt.join_space(space, peers=[nodes[0].peer_id])
    return nodes, space


PUSH_ONLY = node_config(fanout=4, anti_entropy_interval_s=3600.0)


async def test_a_replica_that_is_gone_does_not_hold_back_pushes_to_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=11) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, 4, node_config=PUSH_ONLY)
        nodes, space = await push_only_space(cluster, 4, "gone")
        owner = nodes[0]
        net.partition(cluster.hosts[3:], cluster.hosts[:3])  # node 3 is gone for the others
        await owner.crdt.set(space, "first", 1)
        await wait_until_holding(nodes, space, {1: 1, 2: 1}, timeout_s=5)

        # The push of "first" to node 3 waits out its request timeout (10 s); "second" must not
        # wait behind it: two push delays and a round trip, not the timeout.
        started = trio.current_time()
        await owner.crdt.set(space, "second", 2)
        await wait_until_holding(nodes, space, {1: 2, 2: 2}, timeout_s=10)
        assert trio.current_time() - started < 2.0
        assert owner.crdt.info(space).version_vector == nodes[1].crdt.info(space).version_vector
        nursery.cancel_scope.cancel()


async def test_a_slow_replica_gets_what_it_missed_while_busy_without_waiting_for_anti_entropy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: a batch skipped for a replica busy with a push was never sent to it; a
    # slow but alive replica waited for anti-entropy (here: never).
    async with Network(seed=12) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, 3, node_config=PUSH_ONLY)
        nodes, space = await push_only_space(cluster, 3, "slow")
        owner, slow = nodes[0], nodes[2]
        cluster.hosts[2].set_link(LinkConfig(latency_s=1.0))  # 4 s round trips to the others
        await owner.crdt.set(space, "first", 1)
        await trio.sleep(1.0)  # the pushes of "first" to the slow replica are under way
        await owner.crdt.set(space, "second", 2)
        await wait_until_holding(nodes, space, {1: 2, 2: 2}, timeout_s=30)
        assert slow.crdt.get(space) == {"first": 1, "second": 2}
        nursery.cancel_scope.cancel()


def forged_update(author: Identity, key: str) -> bytes:
    """A well-formed Yrs update under ``author``'s own client id (so only the ACL can refuse it)."""
    doc: pycrdt.Doc[object] = pycrdt.Doc(client_id=yrs_client_id(author.peer_id))
    doc.get(ROOT_MAP, type=pycrdt.Map)[key] = "forged"
    return doc.get_update()


async def push_to_all(sender: Node, nodes: Sequence[Node], space: SpaceId, author: Identity, seq: int, key: str) -> int:
    """Push one envelope signed by ``author`` straight to every node; returns how many applied it."""
    envelope = sign_envelope(author, space, seq, EnvelopeKind.UPDATE, forged_update(author, key))
    applied = 0
    for node in nodes:
        if node is sender:
            continue
        try:
            reply = await sender.rpc.request(node.peer_id, PROTOCOL_ID, encode_message(Push(space.key, [envelope])))
        except RpcError:
            continue
        applied += msgspec.msgpack.decode(reply)["applied"]
    return applied


async def test_unauthorized_and_revoked_writers_are_refused_by_every_replica(
    autojump_clock: trio.testing.MockClock,
) -> None:
    size = 8
    async with Network(seed=3) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, size, node_config=NODE_CONFIG, link=LOSSY_LINK)
        nodes = await start_cluster(cluster, size)
        owner, writer, stranger = nodes[0], nodes[1], nodes[7]
        space = (await owner.crdt.create_space("acl", writers=[writer.peer_id])).space_id
        async with trio.open_nursery() as joins:
            for node in nodes[1:]:
                joins.start_soon(lambda node=node: node.crdt.join_space(space, peers=[owner.peer_id]))

        # A peer that was never granted: refused on arrival, so never stored nor forwarded.
        with pytest.raises(NotWriterError):
            await stranger.crdt.set(space, "mine", 1)
        assert await push_to_all(stranger, nodes, space, identity(7), 1, "stranger") == 0

        # A writer, then revoked after its first update; its later update is refused everywhere.
        await writer.crdt.set(space, "w1", "kept")
        await wait_until_holding(nodes, space, dict.fromkeys(range(size), 2), timeout_s=60)  # grant, w1
        await owner.crdt.revoke(space, writer.peer_id)
        await wait_until_holding(nodes, space, dict.fromkeys(range(size), 3), timeout_s=60)  # and the revoke
        with pytest.raises(NotWriterError):
            await writer.crdt.set(space, "w2", 1)
        assert await push_to_all(writer, nodes, space, identity(1), 2, "w2") == 0

        # Anti-entropy rounds afterwards change nothing: nobody holds either update.
        for node in nodes:
            await node.crdt.sync_now(space)
        for node in nodes:
            state = node.crdt.get(space)
            assert state == {"w1": "kept"}
            vector = node.crdt.info(space).version_vector
            assert vector.get(stranger.peer_id) is None and vector[writer.peer_id] == 1
            assert node.crdt.info(space).writers == [owner.peer_id]
        nursery.cancel_scope.cancel()


async def test_a_joiner_finds_replicas_through_the_dht(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=5) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, 6, node_config=NODE_CONFIG)
        await cluster.start_all(range(6), seeds=[0])
        owner, joiner = cluster.nodes[1], cluster.nodes[4]
        space = (await owner.crdt.create_space("found")).space_id
        await owner.crdt.set(space, "where", "dht")
        await owner.dht.provide(space_cid(space))  # what create_space started in the background
        info = await joiner.crdt.join_space(str(space))  # no peers named: provider records only
        assert info.owner == owner.peer_id
        assert joiner.crdt.get(space) == {"where": "dht"}
        with pytest.raises(JoinError):
            await joiner.crdt.join_space(str(SpaceId(bytes(32))))
        nursery.cancel_scope.cancel()


async def test_replicas_named_by_a_lying_replica_are_tried_not_trusted(autojump_clock: trio.testing.MockClock) -> None:
    # Review finding: one hostile replica answered every sync with 16 invented peer ids and
    # "more"; every name was remembered as a replica, so one sync replaced a whole table and
    # the poisoned nodes passed the names on (a write took 306 s to arrive, 1.1 s before).
    # Named replicas are now hints, tried once and kept only if they answer.
    size = 6  # 0 owner, 1..4 honest, 5 hostile
    async with Network(seed=18) as net, trio.open_nursery() as nursery:
        cluster = DhtCluster(net, nursery, size, node_config=NODE_CONFIG, link=LinkConfig(latency_s=0.025))
        nodes = [await cluster.start(i) for i in range(size)]
        for node in nodes:
            for other in nodes:
                if other is not node:
                    node.connections.add_addresses(other.peer_id, other.listen_addresses())
        space = (await nodes[0].crdt.create_space("jobs", writers=[n.peer_id for n in nodes[1:]])).space_id
        for node in nodes[1:]:
            await node.crdt.join_space(space, peers=[nodes[0].peer_id])
        invented = 0
        honest_handler = nodes[5].crdt._handle_request

        async def lying(peer: PeerId, payload: bytes) -> bytes:
            nonlocal invented
            reply = decode_reply(await honest_handler(peer, payload))
            if isinstance(reply, SyncReply):
                fakes = [Identity.from_seed(b"%032d" % (invented + i)).peer_id.key for i in range(16)]
                invented += 16
                reply = msgspec.structs.replace(reply, envelopes=[], replicas=fakes, more=True)
            return encode_message(reply)

        nodes[5].rpc.add_handler(PROTOCOL_ID, lying)
        await trio.sleep(120)  # anti-entropy every 2.5-7.5 s: many syncs with the liar
        real = {n.peer_id for n in nodes}
        assert invented > 100
        for node in nodes[:5]:
            assert set(node.crdt._spaces[space].replicas) <= real  # no invented id is a replica
        await nodes[1].crdt.set(space, "probe", 1)
        want = sum(nodes[1].crdt.info(space).version_vector.values())
        with trio.fail_after(15):  # virtual seconds: pushes, not a crawl through invented ids
            for node in nodes[2:5]:
                while sum(node.crdt.info(space).version_vector.values()) < want:
                    await node.crdt.wait_change(space)
        nursery.cancel_scope.cancel()
