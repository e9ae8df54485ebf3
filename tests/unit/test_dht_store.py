"""sqlite persistence: reopen, expiry purge, size cap with farthest-first eviction."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattica.dht.errors import StaleRecordError, StoreFullError
from lattica.dht.keys import xor_distance
from lattica.dht.records import SignedRecord, encode_record, sign_provider_record, sign_record
from lattica.dht.store import DhtStore, StoredPeer
from lattica.identity import Identity

NOW = 1_750_000_000
OWN = Identity.from_seed(bytes([9]) * 32)
WRITERS = [Identity.from_seed(bytes([i + 10]) * 32) for i in range(40)]


def record(writer: Identity, key: bytes = b"k", *, seq: int = 1, ttl: int = 3600, size: int = 10) -> SignedRecord:
    return sign_record(writer, key, b"v" * size, seq=seq, expires_at=NOW + ttl)


def open_store(path: Path | str, max_bytes: int = 1 << 30) -> DhtStore:
    return DhtStore(path, own_key=OWN.peer_id.dht_key(), max_bytes=max_bytes)


def test_everything_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    store = open_store(db)
    r = record(WRITERS[0])
    mine = record(OWN, b"mine")
    provider = sign_provider_record(WRITERS[1], b"cid", [("198.51.100.1", 4001)], expires_at=NOW + 60)
    peer = StoredPeer(WRITERS[2].peer_id, [("198.51.100.2", 4001)], float(NOW))
    assert store.put_record(r)
    assert store.put_record(mine, own=True)
    assert store.add_provider(provider)
    store.add_provided(b"cid-i-serve")
    store.save_peers([peer])
    total = store.total_bytes
    store.close()

    again = open_store(db)
    assert again.get_record(r.dht_key, now=NOW) == r
    assert again.own_records(now=NOW) == [mine]
    assert again.get_providers(provider.dht_key, now=NOW, limit=10) == [provider]
    assert again.provided() == [b"cid-i-serve"]
    assert again.load_peers() == [peer]
    assert again.total_bytes == total
    (mode,) = again._db.execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"
    again.close()


def test_newest_wins_and_stale_is_refused() -> None:
    store = open_store(":memory:")
    v1, v2 = record(WRITERS[0], seq=1), record(WRITERS[0], seq=2)
    assert store.put_record(v2)
    assert not store.put_record(v2)  # identical: already held
    with pytest.raises(StaleRecordError):
        store.put_record(v1)
    assert store.get_record(v2.dht_key, now=NOW) == v2
    assert store.record_count() == 1


def test_expired_entries_are_hidden_then_purged() -> None:
    store = open_store(":memory:")
    short = record(WRITERS[0], ttl=10)
    long = record(WRITERS[1], ttl=1000)
    provider = sign_provider_record(WRITERS[2], b"cid", [], expires_at=NOW + 10)
    store.put_record(short)
    store.put_record(long)
    store.add_provider(provider)
    assert store.get_record(short.dht_key, now=NOW + 10) is None
    assert store.get_providers(provider.dht_key, now=NOW + 10, limit=5) == []
    assert store.purge_expired(now=NOW + 10) == 2
    assert store.record_count() == 1
    assert store.get_record(long.dht_key, now=NOW + 10) == long


def test_size_cap_evicts_farthest_from_own_id_first() -> None:
    own_key = OWN.peer_id.dht_key()
    records = [record(w, size=1000) for w in WRITERS[:10]]
    per_record = len(encode_record(records[0]))
    store = open_store(":memory:", max_bytes=per_record * 6)
    by_distance = sorted(records, key=lambda r: xor_distance(r.dht_key, own_key))
    for r in by_distance[:6]:
        assert store.put_record(r)
    assert store.total_bytes <= store.max_bytes
    # A nearer record pushes out the farthest one.
    nearer_than_all = None
    for w in WRITERS[10:]:
        candidate = record(w, size=1000)
        if xor_distance(candidate.dht_key, own_key) < xor_distance(by_distance[5].dht_key, own_key):
            nearer_than_all = candidate
            break
    assert nearer_than_all is not None
    assert store.put_record(nearer_than_all)
    assert store.get_record(by_distance[5].dht_key, now=NOW) is None
    assert store.get_record(by_distance[0].dht_key, now=NOW) is not None
    assert store.total_bytes <= store.max_bytes
    # A record farther than everything held is refused, not stored-then-dropped.
    with pytest.raises(StoreFullError):
        store.put_record(by_distance[9])
    assert store.get_record(by_distance[9].dht_key, now=NOW) is None


def test_own_records_are_never_evicted_and_always_fit_if_possible() -> None:
    store = open_store(":memory:", max_bytes=3000)
    stored = [r for r in (record(w, size=1000) for w in WRITERS[:3]) if _try_put(store, r)]
    assert stored
    mine = record(OWN, b"mine", size=1000)
    assert store.put_record(mine, own=True)
    assert store.own_records(now=NOW) == [mine]
    assert store.total_bytes <= 3000


def _try_put(store: DhtStore, r: SignedRecord) -> bool:
    try:
        return store.put_record(r)
    except StoreFullError:
        return False
