"""The sans-I/O iterative lookup, driven by scripted responses."""

from __future__ import annotations

import random

import pytest

from lattica.dht.keys import xor_distance
from lattica.dht.lookup import Lookup, LookupStats
from lattica.errors import LocalProtocolError
from lattica.identity import Identity, PeerId

WORLD = [Identity.from_seed(i.to_bytes(2, "big") * 16).peer_id for i in range(300)]
TARGET = Identity.from_seed(b"\xee" * 32).peer_id.dht_key()


def by_distance(peers: list[PeerId], target: bytes) -> list[PeerId]:
    return sorted(peers, key=lambda p: xor_distance(p.dht_key(), target))


def build_knowledge(seed: int = 7) -> dict[PeerId, list[PeerId]]:
    """Each peer knows its 20 nearest peers and 20 random ones (a healthy Kademlia network)."""
    rng = random.Random(seed)
    knowledge = {}
    for p in WORLD:
        others = [q for q in WORLD if q != p]
        knowledge[p] = by_distance(others, p.dht_key())[:20] + rng.sample(others, 20)
    return knowledge


KNOWLEDGE = build_knowledge()


def answer(peer: PeerId, target: bytes, k: int = 20) -> list[PeerId]:
    return by_distance(KNOWLEDGE[peer], target)[:k]


def run(lookup: Lookup[str], dead: frozenset[PeerId] = frozenset()) -> list[PeerId]:
    """Answer queries in FIFO order; returns every peer queried, in order."""
    queried: list[PeerId] = []
    pending: list[PeerId] = []
    while not lookup.done:
        batch = lookup.next_queries(now=0.0)
        queried += batch
        pending += batch
        assert lookup.in_flight <= lookup.alpha * len(lookup.path_results())
        if not pending:
            break
        peer = pending.pop(0)
        if peer in dead:
            lookup.on_failure(peer)
        else:
            lookup.on_response(peer, answer(peer, lookup.target))
    return queried


def test_converges_on_the_true_k_closest() -> None:
    seeds = random.Random(1).sample(WORLD, 3)
    lookup: Lookup[str] = Lookup(TARGET, seeds, k=20, alpha=3)
    queried = run(lookup)
    assert lookup.done and not lookup.timed_out
    assert lookup.result() == by_distance(WORLD, TARGET)[:20]
    assert len(queried) == len(set(queried))  # nobody is asked twice
    assert len(queried) < 120  # it homes in rather than flooding the network


def test_alpha_bounds_parallel_queries() -> None:
    lookup: Lookup[str] = Lookup(TARGET, WORLD[:50], k=20, alpha=3)
    first = lookup.next_queries(now=0.0)
    assert len(first) == 3
    assert lookup.next_queries(now=0.0) == []  # nothing more until an answer arrives
    lookup.on_response(first[0], [])
    assert len(lookup.next_queries(now=0.0)) == 1
    # The first queries go to the closest seeds.
    assert first == by_distance(WORLD[:50], TARGET)[:3]


def test_failed_peers_are_dropped_and_never_retried() -> None:
    truth = by_distance(WORLD, TARGET)
    dead = frozenset(truth[:5])
    seeds = random.Random(2).sample(WORLD, 3)
    lookup: Lookup[str] = Lookup(TARGET, seeds, k=20, alpha=3)
    queried = run(lookup, dead)
    assert lookup.done
    result = lookup.result()
    assert not set(result) & dead
    assert result == [p for p in truth if p not in dead][:20]
    assert len(queried) == len(set(queried))


def test_deadline_ends_the_lookup_with_partial_results() -> None:
    lookup: Lookup[str] = Lookup(TARGET, WORLD[:10], k=20, alpha=3, deadline=5.0)
    batch = lookup.next_queries(now=1.0)
    lookup.on_response(batch[0], answer(batch[0], TARGET))
    assert not lookup.done
    assert lookup.next_queries(now=5.0) == []
    assert lookup.done and lookup.timed_out
    assert lookup.result() == [batch[0]]


def test_stop_and_values() -> None:
    lookup: Lookup[str] = Lookup(TARGET, WORLD[:10], k=20, alpha=3)
    batch = lookup.next_queries()
    lookup.on_response(batch[0], [], value="found")
    assert lookup.values == [(batch[0], "found")]
    lookup.stop()
    assert lookup.done and lookup.next_queries() == []


def test_stats_count_hops_along_the_chain_of_referrals() -> None:
    a, b, c, d = WORLD[:4]
    lookup: Lookup[str] = Lookup(TARGET, [a], k=20, alpha=1)
    assert lookup.stats() == LookupStats(
        queries=0, responses=0, failures=0, hops=0, first_value_hops=None, timed_out=False
    )
    assert lookup.next_queries() == [a]
    lookup.on_response(a, [b, d])  # a is a seed: 1 hop; b and d are 2 hops
    [first] = lookup.next_queries()
    second = d if first == b else b
    lookup.on_failure(first)
    assert lookup.next_queries() == [second]
    lookup.on_response(second, [c], value="found")  # c is 3 hops
    assert lookup.next_queries() == [c]
    lookup.on_response(c, [a], value="again")  # a seed heard of again stays 1 hop away
    assert lookup.stats() == LookupStats(
        queries=4, responses=3, failures=1, hops=3, first_value_hops=2, timed_out=False
    )


def test_stats_of_a_converged_lookup() -> None:
    lookup: Lookup[str] = Lookup(TARGET, random.Random(1).sample(WORLD, 3), k=20, alpha=3)
    queried = run(lookup)
    stats = lookup.stats()
    assert stats.queries == stats.responses == len(queried)
    # Homing in on 20 of 300 peers known 40 at a time takes a few rounds, not one and not dozens.
    assert 2 <= stats.hops <= 8


def test_misuse_is_a_local_protocol_error() -> None:
    lookup: Lookup[str] = Lookup(TARGET, WORLD[:10], k=20, alpha=3)
    with pytest.raises(LocalProtocolError):
        lookup.on_response(WORLD[0], [])
    batch = lookup.next_queries()
    lookup.on_failure(batch[0])
    with pytest.raises(LocalProtocolError):
        lookup.on_response(batch[0], [])  # a late answer after the timeout was reported
    with pytest.raises(LocalProtocolError):
        Lookup(TARGET, [], alpha=0)


def test_own_id_is_never_queried() -> None:
    me = WORLD[0]
    lookup: Lookup[str] = Lookup(TARGET, [me, *WORLD[1:4]], k=20, alpha=3, own_id=me.dht_key())
    assert me not in run(lookup)


def test_no_seeds_is_immediately_done() -> None:
    lookup: Lookup[str] = Lookup(TARGET, [], k=20, alpha=3)
    assert lookup.done and lookup.result() == []


def test_disjoint_paths_never_share_a_peer() -> None:
    seeds = random.Random(3).sample(WORLD, 8)
    lookup: Lookup[str] = Lookup(TARGET, seeds, k=10, alpha=2, disjoint_paths=4)
    queried = run(lookup)
    assert lookup.done
    assert len(queried) == len(set(queried))
    paths = [set(p) for p in lookup.path_results()]
    assert len(paths) == 4 and all(paths)
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            assert not a & b
    # Merged, the paths still find the closest peers.
    truth = by_distance(WORLD, TARGET)
    assert lookup.result()[:3] == truth[:3]


SYBILS = by_distance([Identity.from_seed(b"sybil" + i.to_bytes(27, "big")).peer_id for i in range(20000)], TARGET)[:20]


def poisoned_run(disjoint_paths: int) -> Lookup[str]:
    """One liar seed answers with Sybils near the target; Sybils only name each other."""
    liar = WORLD[0]
    honest_seed = WORLD[1]

    def respond(peer: PeerId) -> list[PeerId]:
        if peer == liar or peer in SYBILS:
            return SYBILS[:20]
        return answer(peer, TARGET)

    lookup: Lookup[str] = Lookup(TARGET, [liar, honest_seed], k=20, alpha=3, disjoint_paths=disjoint_paths)
    pending: list[PeerId] = []
    while not lookup.done:
        pending += lookup.next_queries()
        if not pending:
            break
        peer = pending.pop(0)
        lookup.on_response(peer, respond(peer))
    return lookup


def test_disjoint_paths_keep_an_honest_path_when_one_seed_lies() -> None:
    honest_closest = set(by_distance(WORLD, TARGET)[:5])
    single = poisoned_run(1)
    assert not honest_closest & set(single.result())  # the Sybils eclipse a plain lookup
    disjoint = poisoned_run(2)
    assert any(honest_closest <= set(path) for path in disjoint.path_results())
