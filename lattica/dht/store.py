"""Persistent DHT state in sqlite: records, provider records, provided cids, routing table.

Durability: WAL journal with ``synchronous=FULL`` and one transaction per change, so anything a
method has returned from (and so anything the node acknowledged to a peer) survives ``kill -9``.

Invariants:

* Only validated records are passed in (the service validates); the store enforces ordering
  (newest ``(seq, expires_at)`` wins, see :func:`~lattica.dht.records.check_not_stale`).
* Reads never return an expired entry; :meth:`DhtStore.purge_expired` deletes them.
* Size cap: the byte size of stored records and provider records (encoded) stays at or below
  ``max_bytes``. When an insert would exceed it, entries *farther from our own id* (XOR
  distance of their DHT key) than the new entry are evicted, farthest first; our own records
  are never evicted. If that cannot make room the insert is refused with
  :class:`StoreFullError` -- an entry is never acknowledged and then silently dropped.
  Rationale: a node is responsible for keys near its id, so far keys are the ones other nodes
  hold as well.

The store is synchronous (sqlite3); calls are short and made from the trio thread.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import msgspec

from lattica.dht.errors import StoreFullError
from lattica.dht.keys import key_to_int
from lattica.dht.records import (
    ProviderRecord,
    SignedRecord,
    check_not_stale,
    decode_provider_record,
    decode_record,
    encode_record,
)
from lattica.identity import PeerId
from lattica.net.datagram import Address

DEFAULT_MAX_STORE_BYTES = 256 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dht_records (
    dht_key BLOB PRIMARY KEY,
    data BLOB NOT NULL,
    seq INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    own INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dht_records_expiry ON dht_records(expires_at);
CREATE TABLE IF NOT EXISTS dht_providers (
    dht_key BLOB NOT NULL,
    provider BLOB NOT NULL,
    data BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (dht_key, provider)
);
CREATE INDEX IF NOT EXISTS dht_providers_expiry ON dht_providers(expires_at);
CREATE TABLE IF NOT EXISTS dht_provided (
    cid BLOB PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS dht_peers (
    peer_id BLOB PRIMARY KEY,
    addresses BLOB NOT NULL,
    last_seen REAL NOT NULL
);
"""

_addresses_decoder = msgspec.msgpack.Decoder(list[tuple[str, int]])


@dataclass(frozen=True)
class StoredPeer:
    """A routing-table entry as persisted: who, where, and when last heard from (unix s)."""

    peer_id: PeerId
    addresses: list[Address]
    last_seen: float


class DhtStore:
    """sqlite-backed storage for one node's DHT state (see the module docstring).

    ``path`` is a file path or ``":memory:"``; ``own_key`` is this node's 32-byte DHT id (used
    by the eviction policy); ``max_bytes`` caps stored record bytes.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        own_key: bytes,
        max_bytes: int = DEFAULT_MAX_STORE_BYTES,
    ) -> None:
        self.own_key = own_key
        self._own_int = key_to_int(own_key)
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._total_bytes = self._sum_sizes()

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()

    def _sum_sizes(self) -> int:
        (records,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM dht_records").fetchone()
        (providers,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM dht_providers").fetchone()
        return int(records) + int(providers)

    @property
    def total_bytes(self) -> int:
        """Bytes currently counted against ``max_bytes``."""
        return self._total_bytes

    # -- records -----------------------------------------------------------------------------

    def put_record(self, record: SignedRecord, *, own: bool = False) -> bool:
        """Store a validated record unless an equal or newer one is held.

        Returns True when stored, False when the identical record was already held. Raises
        :class:`StaleRecordError` when it is older than the held one, :class:`StoreFullError`
        when the size cap leaves no room.
        """
        held_row = self._db.execute(
            "SELECT data, own, size FROM dht_records WHERE dht_key = ?", (record.dht_key,)
        ).fetchone()
        held = decode_record(held_row[0]) if held_row else None
        if not check_not_stale(record, held):
            if own and not held_row[1]:
                self._db.execute("UPDATE dht_records SET own = 1 WHERE dht_key = ?", (record.dht_key,))
            return False
        data = encode_record(record)
        old_size = int(held_row[2]) if held_row else 0
        own = own or bool(held_row and held_row[1])
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._make_room(record.dht_key, len(data) - old_size, own=own)
            self._db.execute(
                "INSERT OR REPLACE INTO dht_records (dht_key, data, seq, expires_at, own, size)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record.dht_key, data, record.seq, record.expires_at, int(own), len(data)),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._total_bytes = self._sum_sizes()
            raise
        self._total_bytes += len(data) - old_size
        return True

    def get_record(self, dht_key: bytes, *, now: float) -> SignedRecord | None:
        """The unexpired record at ``dht_key``, if held."""
        row = self._db.execute(
            "SELECT data FROM dht_records WHERE dht_key = ? AND expires_at > ?", (dht_key, now)
        ).fetchone()
        return decode_record(row[0]) if row else None

    def own_records(self, *, now: float) -> list[SignedRecord]:
        """Unexpired records this node wrote (republished periodically)."""
        rows = self._db.execute("SELECT data FROM dht_records WHERE own = 1 AND expires_at > ?", (now,)).fetchall()
        return [decode_record(row[0]) for row in rows]

    def record_count(self) -> int:
        """Number of stored records (expired ones included until purged)."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM dht_records").fetchone()
        return int(count)

    # -- provider records ----------------------------------------------------------------------

    def add_provider(self, record: ProviderRecord) -> bool:
        """Store a validated provider record; a later ``expires_at`` replaces an earlier one.

        Returns True when stored, False when an equal or newer one for the same provider is held.
        Raises :class:`StoreFullError` when the size cap leaves no room.
        """
        row = self._db.execute(
            "SELECT expires_at, size FROM dht_providers WHERE dht_key = ? AND provider = ?",
            (record.dht_key, record.provider),
        ).fetchone()
        if row and int(row[0]) >= record.expires_at:
            return False
        data = encode_record(record)
        old_size = int(row[1]) if row else 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._make_room(record.dht_key, len(data) - old_size, own=False)
            self._db.execute(
                "INSERT OR REPLACE INTO dht_providers (dht_key, provider, data, expires_at, size)"
                " VALUES (?, ?, ?, ?, ?)",
                (record.dht_key, record.provider, data, record.expires_at, len(data)),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._total_bytes = self._sum_sizes()
            raise
        self._total_bytes += len(data) - old_size
        return True

    def get_providers(self, dht_key: bytes, *, now: float, limit: int) -> list[ProviderRecord]:
        """Up to ``limit`` unexpired provider records at ``dht_key``, longest-lived first."""
        rows = self._db.execute(
            "SELECT data FROM dht_providers WHERE dht_key = ? AND expires_at > ? ORDER BY expires_at DESC LIMIT ?",
            (dht_key, now, limit),
        ).fetchall()
        return [decode_provider_record(row[0]) for row in rows]

    def add_provided(self, cid: bytes) -> None:
        """Remember that this node provides ``cid`` (republished until removed)."""
        self._db.execute("INSERT OR IGNORE INTO dht_provided (cid) VALUES (?)", (cid,))

    def remove_provided(self, cid: bytes) -> None:
        """Stop republishing ``cid``."""
        self._db.execute("DELETE FROM dht_provided WHERE cid = ?", (cid,))

    def provided(self) -> list[bytes]:
        """Content ids this node provides."""
        return [bytes(r[0]) for r in self._db.execute("SELECT cid FROM dht_provided")]

    # -- routing table -------------------------------------------------------------------------

    def save_peers(self, peers: list[StoredPeer]) -> None:
        """Replace the persisted routing table with ``peers`` (one transaction)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM dht_peers")
            self._db.executemany(
                "INSERT OR REPLACE INTO dht_peers (peer_id, addresses, last_seen) VALUES (?, ?, ?)",
                [(p.peer_id.key, msgspec.msgpack.encode(p.addresses), p.last_seen) for p in peers],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def load_peers(self) -> list[StoredPeer]:
        """The persisted routing table, most recently seen first (damaged rows are skipped)."""
        peers = []
        for key, addresses, last_seen in self._db.execute(
            "SELECT peer_id, addresses, last_seen FROM dht_peers ORDER BY last_seen DESC"
        ):
            try:
                decoded = _addresses_decoder.decode(addresses)
                peers.append(StoredPeer(PeerId(bytes(key)), list(decoded), float(last_seen)))
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
                continue
        return peers

    # -- expiry and size cap -------------------------------------------------------------------

    def purge_expired(self, *, now: float) -> int:
        """Delete expired records and provider records; returns how many were deleted."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            deleted = self._db.execute("DELETE FROM dht_records WHERE expires_at <= ?", (now,)).rowcount
            deleted += self._db.execute("DELETE FROM dht_providers WHERE expires_at <= ?", (now,)).rowcount
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._total_bytes = self._sum_sizes()
        return int(deleted)

    def _distance(self, dht_key: bytes) -> int:
        return int.from_bytes(dht_key, "big") ^ self._own_int

    def _make_room(self, dht_key: bytes, extra_bytes: int, *, own: bool) -> None:
        """Inside a transaction: evict farther entries until ``extra_bytes`` more fit."""
        excess = self._total_bytes + extra_bytes - self.max_bytes
        if excess <= 0:
            return
        new_distance = self._distance(dht_key)
        candidates: list[tuple[int, str, bytes, bytes | None, int]] = []
        for key, size in self._db.execute("SELECT dht_key, size FROM dht_records WHERE own = 0"):
            candidates.append((self._distance(key), "record", key, None, int(size)))
        for key, provider, size in self._db.execute("SELECT dht_key, provider, size FROM dht_providers"):
            candidates.append((self._distance(key), "provider", key, provider, int(size)))
        candidates.sort(key=lambda c: c[0], reverse=True)
        victims = []
        freed = 0
        for distance, kind, key, provider, size in candidates:
            if freed >= excess:
                break
            if key == dht_key:
                continue
            if distance <= new_distance and not own:
                break
            victims.append((kind, key, provider))
            freed += size
        if freed < excess:
            raise StoreFullError(
                f"DHT store is full ({self._total_bytes} of {self.max_bytes} bytes) "
                "and holds nothing farther from our id to evict"
            )
        for kind, key, provider in victims:
            if kind == "record":
                self._db.execute("DELETE FROM dht_records WHERE dht_key = ?", (key,))
            else:
                self._db.execute("DELETE FROM dht_providers WHERE dht_key = ? AND provider = ?", (key, provider))
        self._total_bytes -= freed
