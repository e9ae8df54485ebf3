"""Lookup queries: validation of answers and stop rules (no I/O)."""

from __future__ import annotations

import msgspec

from lattica.dht.keys import record_key
from lattica.dht.messages import Nodes, PeerInfo, Providers, Value
from lattica.dht.queries import PeerQuery, ProvidersQuery, ValueQuery
from lattica.dht.records import sign_provider_record, sign_record
from lattica.identity import Identity

NOW = 1_800_000_000.0
WRITER = Identity.from_seed(bytes([1]) * 32)
PEERS = [Identity.from_seed(bytes([i + 2]) * 32).peer_id for i in range(4)]


def info(i: int) -> PeerInfo:
    return PeerInfo.of(PEERS[i], [(f"198.51.100.{i + 1}", 4001)])


def test_value_query_keeps_valid_records_only_and_answers_at_its_quorum() -> None:
    key = record_key(WRITER.peer_id, b"k")
    old = sign_record(WRITER, b"k", b"old", seq=1, expires_at=int(NOW) + 3600)
    new = sign_record(WRITER, b"k", b"new", seq=2, expires_at=int(NOW) + 3600)
    forged = msgspec.structs.replace(new, seq=3)
    query = ValueQuery(key, need=2, value_count=3, max_record_ttl_s=86400)
    assert query.on_reply(PEERS[0], Value(sender=info(0), record=forged), NOW).value is None
    assert not query.has_quorum()
    query.on_reply(PEERS[1], Value(sender=info(1), record=old, closer=[info(3)]), NOW)
    outcome = query.on_reply(PEERS[2], Value(sender=info(2), record=new), NOW)
    assert outcome.value == new and query.has_quorum() and not query.satisfied()
    assert query.newest() == new and query.outdated() == [PEERS[1]]


def test_providers_query_stops_at_count_and_peer_query_when_the_peer_is_named() -> None:
    provider = Identity.from_seed(bytes([9]) * 32)
    record = sign_provider_record(provider, b"cid", [("198.51.100.9", 4001)], expires_at=int(NOW) + 3600)
    other_cid = sign_provider_record(provider, b"other", [("198.51.100.9", 4001)], expires_at=int(NOW) + 3600)
    query = ProvidersQuery(b"cid", count=1, provider_ttl_s=48 * 3600)
    query.on_reply(PEERS[0], Providers(sender=info(0), providers=[other_cid]), NOW)
    assert not query.satisfied()
    query.on_reply(PEERS[1], Providers(sender=info(1), providers=[record]), NOW)
    assert query.satisfied() and query.result() == [record]

    find = PeerQuery(PEERS[3])
    find.on_reply(PEERS[0], Nodes(sender=info(0), closer=[info(1)]), NOW)
    assert not find.satisfied()
    find.on_reply(PEERS[1], Nodes(sender=info(1), closer=[info(3)]), NOW)
    assert find.satisfied() and find.addresses == [("198.51.100.4", 4001)]
