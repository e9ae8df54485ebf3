"""sqlite persistence: reopen, expiry purge, size cap with farthest-first eviction."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest
import trio

from lattica.dht.errors import StaleRecordError, StoreFullError, WriterQuotaError
from lattica.dht.keys import xor_distance
from lattica.dht.records import SignedRecord, encode_record, sign_provider_record, sign_record
from lattica.dht.store import DhtStore, StoredPeer
from lattica.identity import Identity
from lattica.storage import CorruptDatabaseError, DiskFullError

NOW = 1_750_000_000
OWN = Identity.from_seed(bytes([9]) * 32)
WRITERS = [Identity.from_seed(bytes([i + 10]) * 32) for i in range(40)]


def record(writer: Identity, key: bytes = b"k", *, seq: int = 1, ttl: int = 3600, size: int = 10) -> SignedRecord:
    return sign_record(writer, key, b"v" * size, seq=seq, expires_at=NOW + ttl)


def open_store(path: Path | str, max_bytes: int = 1 << 30) -> DhtStore:
    return DhtStore(path, own_key=OWN.peer_id.dht_key(), max_bytes=max_bytes)


async def test_everything_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    store = open_store(db)
    r = record(WRITERS[0])
    mine = record(OWN, b"mine")
    provider = sign_provider_record(WRITERS[1], b"cid", [("198.51.100.1", 4001)], expires_at=NOW + 60)
    peer = StoredPeer(WRITERS[2].peer_id, [("198.51.100.2", 4001)], float(NOW))
    assert await store.put_record(r)
    assert await store.put_record(mine, own=True)
    assert await store.add_provider(provider)
    await store.add_provided(b"cid-i-serve")
    await store.save_peers([peer])
    total = store.total_bytes
    store.close()

    again = open_store(db)
    assert again.get_record(r.dht_key, now=NOW) == r
    assert again.own_records(now=NOW) == [mine]
    assert again.get_providers(provider.dht_key, now=NOW, limit=10) == [provider]
    assert again.provided() == [b"cid-i-serve"]
    assert again.load_peers() == [peer]
    assert again.total_bytes == total
    (mode,) = again.writer.read(lambda c: c.execute("PRAGMA journal_mode").fetchone())
    assert mode == "wal"
    again.close()


async def test_newest_wins_and_stale_is_refused() -> None:
    store = open_store(":memory:")
    v1, v2 = record(WRITERS[0], seq=1), record(WRITERS[0], seq=2)
    assert await store.put_record(v2)
    assert not await store.put_record(v2)  # identical: already held
    with pytest.raises(StaleRecordError):
        await store.put_record(v1)
    assert store.get_record(v2.dht_key, now=NOW) == v2
    assert store.record_count() == 1


async def test_expired_entries_are_hidden_then_purged() -> None:
    store = open_store(":memory:")
    short = record(WRITERS[0], ttl=10)
    long = record(WRITERS[1], ttl=1000)
    provider = sign_provider_record(WRITERS[2], b"cid", [], expires_at=NOW + 10)
    await store.put_record(short)
    await store.put_record(long)
    await store.add_provider(provider)
    assert store.get_record(short.dht_key, now=NOW + 10) is None
    assert store.get_providers(provider.dht_key, now=NOW + 10, limit=5) == []
    assert await store.purge_expired(now=NOW + 10) == 2
    assert store.record_count() == 1
    assert store.get_record(long.dht_key, now=NOW + 10) == long


async def test_size_cap_evicts_farthest_from_own_id_first() -> None:
    own_key = OWN.peer_id.dht_key()
    records = [record(w, size=1000) for w in WRITERS[:10]]
    per_record = len(encode_record(records[0]))
    store = open_store(":memory:", max_bytes=per_record * 6)
    by_distance = sorted(records, key=lambda r: xor_distance(r.dht_key, own_key))
    for r in by_distance[:6]:
        assert await store.put_record(r)
    assert store.total_bytes <= store.max_bytes
    # A nearer record pushes out the farthest one.
    nearer_than_all = None
    for w in WRITERS[10:]:
        candidate = record(w, size=1000)
        if xor_distance(candidate.dht_key, own_key) < xor_distance(by_distance[5].dht_key, own_key):
            nearer_than_all = candidate
            break
    assert nearer_than_all is not None
    assert await store.put_record(nearer_than_all)
    assert store.get_record(by_distance[5].dht_key, now=NOW) is None
    assert store.get_record(by_distance[0].dht_key, now=NOW) is not None
    assert store.total_bytes <= store.max_bytes
    # A record farther than everything held is refused, not stored-then-dropped.
    with pytest.raises(StoreFullError):
        await store.put_record(by_distance[9])
    assert store.get_record(by_distance[9].dht_key, now=NOW) is None


async def test_own_records_are_never_evicted_and_always_fit_if_possible() -> None:
    store = open_store(":memory:", max_bytes=3000)
    stored = [r for r in (record(w, size=1000) for w in WRITERS[:3]) if await _try_put(store, r)]
    assert stored
    mine = record(OWN, b"mine", size=1000)
    assert await store.put_record(mine, own=True)
    assert store.own_records(now=NOW) == [mine]
    assert store.total_bytes <= 3000


async def _try_put(store: DhtStore, r: SignedRecord) -> bool:
    try:
        return await store.put_record(r)
    except StoreFullError:
        return False


async def test_peers_are_saved_incrementally(tmp_path: Path) -> None:
    store = open_store(tmp_path / "lattica.db")
    a, b, c = (StoredPeer(WRITERS[i].peer_id, [("198.51.100.1", 4000 + i)], float(NOW + i)) for i in range(3))
    assert await store.save_peers([a, b, c]) == 3
    assert await store.save_peers([a, b, c]) == 0  # nothing changed, nothing written
    moved = StoredPeer(b.peer_id, [("198.51.100.9", 4001)], float(NOW + 10))
    assert await store.save_peers([a, moved]) == 2  # one update, one delete; ``a`` untouched
    assert store.load_peers() == [moved, a]
    store.close()


def test_a_truncated_database_is_named_and_explained(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"

    async def fill() -> None:
        store = open_store(db)
        for w in WRITERS:
            await store.put_record(record(w, size=2000))
        store.close()

    trio.run(fill)
    os.truncate(db, db.stat().st_size // 2)
    with pytest.raises(CorruptDatabaseError) as caught:
        open_store(db)
    assert str(caught.value) == (
        f"{db} is damaged (database disk image is malformed); move it aside to start with an empty store"
    )


def test_random_bytes_instead_of_a_database_are_named_and_explained(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    db.write_bytes(random.Random(1).randbytes(50_000))
    with pytest.raises(CorruptDatabaseError, match="is not a Lattica database \\(file is not a database\\)"):
        open_store(db)


async def test_full_disk_refuses_the_write_keeps_acknowledged_records_and_serves_reads(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    store = open_store(db)
    first = record(WRITERS[0], size=1000)
    assert await store.put_record(first)
    (pages,) = store.writer.read(lambda c: c.execute("PRAGMA page_count").fetchone())
    store.writer.write_blocking(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 4}"))
    acknowledged = [first]
    with pytest.raises(DiskFullError, match="database or disk is full"):
        for w in WRITERS[1:]:
            r = record(w, size=30_000)
            await store.put_record(r)
            acknowledged.append(r)
    assert all(store.get_record(r.dht_key, now=NOW) == r for r in acknowledged)
    assert store.record_count() == len(acknowledged)
    # The size counter follows what committed, not what was attempted.
    (committed_bytes,) = store.writer.read(lambda c: c.execute("SELECT SUM(size) FROM dht_records").fetchone())
    assert store.total_bytes == committed_bytes
    store.close()
    again = open_store(db)
    assert again.record_count() == len(acknowledged)
    again.close()


async def test_one_writer_cannot_pass_its_quota_and_others_still_fit() -> None:
    per_record = len(encode_record(record(WRITERS[0], b"k0", size=1000)))
    store = DhtStore(":memory:", own_key=OWN.peer_id.dht_key(), max_bytes=1 << 30, max_bytes_per_writer=per_record * 3)
    for i in range(3):
        assert await store.put_record(record(WRITERS[0], f"k{i}".encode(), size=1000))
    with pytest.raises(WriterQuotaError):
        await store.put_record(record(WRITERS[0], b"k3", size=1000))
    # A provider record signed by the same identity counts against the same quota.
    with pytest.raises(WriterQuotaError):
        await store.add_provider(sign_provider_record(WRITERS[0], b"cid", [], expires_at=NOW + 60))
    assert store.record_count() == 3
    assert store.writer_bytes(WRITERS[0].peer_id.key) == per_record * 3
    # Replacing a held record with a newer one of the same size stays within the quota.
    assert await store.put_record(record(WRITERS[0], b"k0", seq=2, size=1000))
    # Other writers are unaffected, and our own records never count.
    assert await store.put_record(record(WRITERS[1], size=1000))
    for i in range(5):
        assert await store.put_record(record(OWN, f"mine{i}".encode(), size=1000), own=True)
    assert store.writer_bytes(OWN.peer_id.key) == 0


async def test_quota_counts_shrink_on_purge_and_eviction_and_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    per_record = len(encode_record(record(WRITERS[0], b"k1", size=1000)))  # every key here is 2 bytes
    store = DhtStore(db, own_key=OWN.peer_id.dht_key(), max_bytes_per_writer=per_record * 2)
    await store.put_record(record(WRITERS[0], b"k1", ttl=10, size=1000))
    await store.put_record(record(WRITERS[0], b"k2", size=1000))
    with pytest.raises(WriterQuotaError):
        await store.put_record(record(WRITERS[0], b"k3", size=1000))
    await store.purge_expired(now=NOW + 10)
    assert store.writer_bytes(WRITERS[0].peer_id.key) == per_record
    assert await store.put_record(record(WRITERS[0], b"k3", size=1000))
    store.close()
    again = DhtStore(db, own_key=OWN.peer_id.dht_key(), max_bytes_per_writer=per_record * 2)
    assert again.writer_bytes(WRITERS[0].peer_id.key) == per_record * 2
    with pytest.raises(WriterQuotaError):
        await again.put_record(record(WRITERS[0], b"k4", size=1000))
    again.close()


async def test_an_evicted_record_frees_its_writers_quota() -> None:
    own_key = OWN.peer_id.dht_key()
    candidates = sorted(
        (record(WRITERS[0], f"k{i}".encode(), size=1000) for i in range(20)),
        key=lambda r: xor_distance(r.dht_key, own_key),
    )
    per_record = len(encode_record(candidates[0]))
    store = DhtStore(":memory:", own_key=own_key, max_bytes=per_record * 2, max_bytes_per_writer=per_record * 2)
    far = candidates[-1]
    far_distance = xor_distance(far.dht_key, own_key)
    near = [r for r in (record(w, size=1000) for w in WRITERS[1:]) if xor_distance(r.dht_key, own_key) < far_distance]
    assert await store.put_record(far)
    assert await store.put_record(candidates[-2])
    assert await store.put_record(near[0])  # evicts the farthest: WRITERS[0]'s ``far``
    assert store.get_record(far.dht_key, now=NOW) is None
    assert store.writer_bytes(WRITERS[0].peer_id.key) == per_record


def test_a_database_from_before_the_distance_columns_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    own_key = OWN.peer_id.dht_key()
    records = [record(w, size=1000) for w in WRITERS[:8]]
    per_record = len(encode_record(records[0]))
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE dht_records (dht_key BLOB PRIMARY KEY, data BLOB NOT NULL, seq INTEGER NOT NULL,"
            " expires_at INTEGER NOT NULL, own INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE dht_providers (dht_key BLOB NOT NULL, provider BLOB NOT NULL, data BLOB NOT NULL,"
            " expires_at INTEGER NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (dht_key, provider))"
        )
        conn.executemany(
            "INSERT INTO dht_records VALUES (?, ?, ?, ?, 0, ?)",
            [(r.dht_key, encode_record(r), r.seq, r.expires_at, per_record) for r in records],
        )
    conn.close()

    async def fill_to_the_cap() -> None:
        store = DhtStore(db, own_key=own_key, max_bytes=per_record * 8)
        assert store.writer_bytes(WRITERS[0].peer_id.key) == per_record
        nearest_newcomer = min(
            (record(w, size=1000) for w in WRITERS[8:]), key=lambda r: xor_distance(r.dht_key, own_key)
        )
        assert await store.put_record(nearest_newcomer)
        farthest_old = max(records, key=lambda r: xor_distance(r.dht_key, own_key))
        assert store.get_record(farthest_old.dht_key, now=NOW) is None
        assert store.record_count() == 8
        store.close()

    trio.run(fill_to_the_cap)


async def test_distances_are_recomputed_when_the_node_id_changes(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    records = [record(w, size=1000) for w in WRITERS[:8]]
    per_record = len(encode_record(records[0]))
    first = DhtStore(db, own_key=OWN.peer_id.dht_key())
    for r in records:
        await first.put_record(r)
    first.close()
    other_key = WRITERS[30].peer_id.dht_key()
    second = DhtStore(db, own_key=other_key, max_bytes=per_record * 8)
    newcomer = min((record(w, size=1000) for w in WRITERS[8:30]), key=lambda r: xor_distance(r.dht_key, other_key))
    assert await second.put_record(newcomer)
    farthest_from_new_id = max(records, key=lambda r: xor_distance(r.dht_key, other_key))
    assert second.get_record(farthest_from_new_id.dht_key, now=NOW) is None
    second.close()
