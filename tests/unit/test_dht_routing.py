"""Routing table: 256-bit buckets, splitting, subnet diversity, liveness-based eviction."""

from __future__ import annotations

from lattica.dht.keys import bucket_index
from lattica.dht.routing import DhtNode, RoutingTable, subnet_of
from lattica.identity import Identity, PeerId

ME = Identity.from_seed(bytes([200]) * 32).peer_id


def peer(i: int) -> PeerId:
    return Identity.from_seed(i.to_bytes(4, "big") * 8).peer_id


def peers_in_bucket(own: PeerId, index: int, count: int, start: int = 0) -> list[PeerId]:
    found, i = [], start
    while len(found) < count:
        p = peer(i)
        if bucket_index(own.dht_key(), p.dht_key()) == index:
            found.append(p)
        i += 1
    return found


def public(i: int) -> list[tuple[str, int]]:
    return [(f"{1 + i // 250}.{i % 250}.7.1", 4000)]  # one /24 per i


def test_table_splits_only_along_own_id_and_holds_k_per_bucket() -> None:
    table = RoutingTable(ME.dht_key(), k=4)
    for i in range(400):
        table.add_contact(DhtNode(peer(i), public(i)), now=1.0)
    assert table.buckets[0].range[0] == 0 and table.buckets[-1].range[1] == 2**256 - 1
    for left, right in zip(table.buckets, table.buckets[1:], strict=False):
        assert left.range[1] + 1 == right.range[0]
    assert all(len(b) <= 4 for b in table.buckets)
    assert len(table.buckets) > 3
    # Every bucket but the one holding our id has split off it: its peers share one log-distance.
    for bucket in table.buckets:
        if not bucket.has_in_range(table.node):
            assert len({bucket_index(ME.dht_key(), n.key) for n in bucket.peers()}) <= 1
    assert ME not in table


def test_own_id_is_never_added() -> None:
    table = RoutingTable(ME.dht_key())
    assert table.add_contact(DhtNode(ME, public(1)), now=0).outcome == "rejected"
    assert len(table) == 0


def test_closest_is_exact() -> None:
    table = RoutingTable(ME.dht_key(), k=20)
    everyone = [peer(i) for i in range(300)]
    for i, p in enumerate(everyone):
        table.add_contact(DhtNode(p, public(i)), now=0)
    target = peer(9999).dht_key()
    present = list(table.peers())
    expected = sorted(present, key=lambda n: int.from_bytes(n.key, "big") ^ int.from_bytes(target, "big"))
    assert [n.peer_id for n in table.closest(target, 5)] == [n.peer_id for n in expected[:5]]


def test_at_most_two_peers_per_ipv4_slash24_per_bucket() -> None:
    table = RoutingTable(ME.dht_key(), k=20)
    far = peers_in_bucket(ME, 255, 4)
    outcomes = [table.add_contact(DhtNode(p, [(f"81.2.69.{10 + i}", 4000)]), now=0).outcome for i, p in enumerate(far)]
    assert outcomes == ["added", "added", "rejected", "rejected"]
    # Not the same /24: fine.
    assert table.add_contact(DhtNode(peer(77777), [("8.8.4.4", 1)]), now=0).outcome == "added"


def test_private_addresses_exempt_by_default_but_not_when_configured() -> None:
    lan = [("192.168.1.5", 4000)]
    far = peers_in_bucket(ME, 255, 3)
    lenient = RoutingTable(ME.dht_key(), k=20)
    assert [lenient.add_contact(DhtNode(p, lan), now=0).outcome for p in far] == ["added"] * 3
    strict = RoutingTable(ME.dht_key(), k=20, diversity_applies_to_private=True)
    assert [strict.add_contact(DhtNode(p, lan), now=0).outcome for p in far] == [
        "added",
        "added",
        "rejected",
    ]


def test_ipv6_groups_by_slash48() -> None:
    assert subnet_of([("2001:db8:1:2::1", 1)], include_private=True) == "2001:db8:1::/48"
    assert subnet_of([("2001:db8:1:ffff::9", 1)], include_private=True) == "2001:db8:1::/48"
    assert subnet_of([("2606:4700::1", 1)], include_private=False) == "2606:4700::/48"
    assert subnet_of([("example.org", 1)], include_private=True) is None
    assert subnet_of([("10.1.2.3", 1)], include_private=False) is None
    assert subnet_of([("10.1.2.3", 1)], include_private=True) == "10.1.2.0/24"


def full_far_bucket(k: int = 4) -> tuple[RoutingTable, list[PeerId], PeerId]:
    table = RoutingTable(ME.dht_key(), k=k)
    far = peers_in_bucket(ME, 255, k + 1)
    for i, p in enumerate(far[:k]):
        assert table.add_contact(DhtNode(p, public(i)), now=float(i)).outcome == "added"
    return table, far[:k], far[k]


def test_full_bucket_asks_for_liveness_check_of_least_recently_seen() -> None:
    table, old, newcomer = full_far_bucket()
    result = table.add_contact(DhtNode(newcomer, public(50)), now=10.0)
    assert result.outcome == "full"
    assert result.check is not None and result.check.peer_id == old[0]
    assert newcomer not in table


def test_long_lived_peer_that_answers_is_kept() -> None:
    table, old, newcomer = full_far_bucket()
    table.add_contact(DhtNode(newcomer, public(50)), now=10.0)
    table.mark_alive(old[0], now=11.0)
    assert old[0] in table and newcomer not in table
    # old[0] is now most recently seen, so the next check is about old[1].
    result = table.add_contact(DhtNode(peer(123456), public(51)), now=12.0)
    if result.outcome == "full":
        assert result.check is not None and result.check.peer_id == old[1]
    node = table.get(old[0])
    assert node is not None and node.first_seen == 0.0 and node.last_seen == 11.0


def test_unresponsive_peer_is_evicted_for_the_newcomer() -> None:
    table, old, newcomer = full_far_bucket()
    table.add_contact(DhtNode(newcomer, public(50)), now=10.0)
    table.remove(old[0])
    assert old[0] not in table and newcomer in table


def test_repeated_failures_evict() -> None:
    table, old, _ = full_far_bucket()
    assert not table.record_failure(old[2], max_failures=2)
    table.add_contact(DhtNode(old[2], public(2)), now=20.0)  # success resets the count
    assert not table.record_failure(old[2], max_failures=2)
    assert table.record_failure(old[2], max_failures=2)
    assert old[2] not in table


def test_stale_buckets_use_the_given_clock() -> None:
    table = RoutingTable(ME.dht_key(), k=2, now=100.0)
    for i in range(30):
        table.add_contact(DhtNode(peer(i), public(i)), now=100.0)
    assert table.stale_buckets(now=150.0, max_age_s=3600) == []
    assert len(table.stale_buckets(now=100.0 + 3600, max_age_s=3600)) == len(table.buckets)
    table.touch_bucket(peer(3).dht_key(), now=3700.0)
    assert len(table.stale_buckets(now=100.0 + 3600, max_age_s=3600)) == len(table.buckets) - 1


def test_empty_far_buckets_and_the_wider_view() -> None:
    table = RoutingTable(ME.dht_key(), k=2)
    far = peers_in_bucket(ME, 255, 2)
    middle = peers_in_bucket(ME, 254, 2)
    near = peers_in_bucket(ME, 253, 2)
    for i, p in enumerate(far + middle + near):
        table.add_contact(DhtNode(p, public(i)), now=float(i))
    # The table now has buckets at distances 255, 254, 253 and one holding our own id.
    assert table.empty_far_buckets() == []
    for p in middle:
        table.remove(p)
    (empty,) = table.empty_far_buckets()
    own = int.from_bytes(ME.dht_key(), "big")
    assert {(empty[0] ^ own).bit_length(), (empty[1] ^ own).bit_length()} == {255}
    # The nearest farther bucket is the one at distance 255; most recently seen first.
    assert [n.peer_id for n in table.wider_view(*empty, count=5)] == list(reversed(far))
    assert [n.peer_id for n in table.wider_view(*empty, count=1)] == [far[1]]
    # Nothing is farther than the farthest bucket.
    far_range = next(b.range for b in table.buckets if far[0] in {n.peer_id for n in b.peers()})
    assert table.wider_view(*far_range, count=3) == []


def test_empty_buckets_nearer_than_the_kth_closest_peer_are_not_reported() -> None:
    table = RoutingTable(ME.dht_key(), k=2)
    peers = peers_in_bucket(ME, 255, 2) + peers_in_bucket(ME, 254, 2) + peers_in_bucket(ME, 252, 1)
    nearest = peers_in_bucket(ME, 249, 2)  # only there to make the table split down to them
    peers += peers_in_bucket(ME, 250, 1) + nearest
    for i, p in enumerate(peers):
        table.add_contact(DhtNode(p, public(i)), now=0.0)
    for p in nearest:
        table.remove(p)
    own = int.from_bytes(ME.dht_key(), "big")
    empty_indices = {(b.range[0] ^ own).bit_length() - 1 for b in table.buckets if len(b) == 0}
    # Bucket 253 lies beyond the 2nd closest peer (in bucket 252): nodes there may exist unseen.
    # Bucket 251 lies between our two closest peers: a self-lookup would have found its nodes.
    assert {253, 251} <= empty_indices
    reported = {(low ^ own).bit_length() - 1 for low, _high in table.empty_far_buckets()}
    assert reported == {253}
