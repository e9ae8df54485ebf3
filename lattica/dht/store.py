"""Persistent DHT state in sqlite: records, provider records, provided cids, routing table.

Durability: writes go through one :class:`~lattica.storage.SqliteWriter` (WAL journal,
``synchronous=FULL``, group commit on a worker thread). Every write method is ``async`` and
returns only after the transaction holding its change committed, so anything a method has
returned from (and so anything the node acknowledged to a peer) survives ``kill -9``. Reads are
synchronous and run on the caller's (trio) thread: a WAL reader sees the last committed state
and never waits for the writer's fsync.

Invariants:

* Only validated records are passed in (the service validates); the store enforces ordering
  (newest ``(seq, expires_at)`` wins, see :func:`~lattica.dht.records.check_not_stale`). The
  check runs inside the write transaction, so concurrent writes of one key cannot both win.
* Reads never return an expired entry; :meth:`DhtStore.purge_expired` deletes them.
* Size cap: the byte size of stored records and provider records (encoded) stays at or below
  ``max_bytes``. When an insert would exceed it, entries *farther from our own id* (XOR
  distance of their DHT key) than the new entry are evicted, farthest first; our own records
  are never evicted. If that cannot make room the insert is refused with
  :class:`StoreFullError` -- an entry is never acknowledged and then silently dropped.
  Rationale: a node is responsible for keys near its id, so far keys are the ones other nodes
  hold as well.
* ``total_bytes`` is kept on the writer thread, changed only after a write's statements all
  succeeded, and recomputed from the tables after any rollback caused by an sqlite error.
* Storage failures raise :class:`~lattica.storage.StorageError` subclasses naming the file
  (``DiskFullError`` for a full disk, ``CorruptDatabaseError`` for a damaged file); the failed
  write is not stored, earlier ones are kept, reads go on.
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
from lattica.storage import SqliteWriter

DEFAULT_MAX_STORE_BYTES = 256 * 1024 * 1024

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS dht_records (
        dht_key BLOB PRIMARY KEY,
        data BLOB NOT NULL,
        seq INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        own INTEGER NOT NULL DEFAULT 0,
        size INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS dht_records_expiry ON dht_records(expires_at)",
    """CREATE TABLE IF NOT EXISTS dht_providers (
        dht_key BLOB NOT NULL,
        provider BLOB NOT NULL,
        data BLOB NOT NULL,
        expires_at INTEGER NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (dht_key, provider)
    )""",
    "CREATE INDEX IF NOT EXISTS dht_providers_expiry ON dht_providers(expires_at)",
    "CREATE TABLE IF NOT EXISTS dht_provided (cid BLOB PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS dht_peers (
        peer_id BLOB PRIMARY KEY,
        addresses BLOB NOT NULL,
        last_seen REAL NOT NULL
    )""",
]

_addresses_decoder = msgspec.msgpack.Decoder(list[tuple[str, int]])


@dataclass(frozen=True)
class StoredPeer:
    """A routing-table entry as persisted: who, where, and when last heard from (unix s)."""

    peer_id: PeerId
    addresses: list[Address]
    last_seen: float


def _create_schema(conn: sqlite3.Connection) -> None:
    # Statement by statement: ``executescript`` would COMMIT the writer's open transaction.
    for statement in _SCHEMA:
        conn.execute(statement)


def _sum_sizes(conn: sqlite3.Connection) -> int:
    # Reads every row of both tables: at open this also finds a truncated file's missing pages.
    (records,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM dht_records").fetchone()
    (providers,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM dht_providers").fetchone()
    return int(records) + int(providers)


class DhtStore:
    """sqlite-backed storage for one node's DHT state (see the module docstring).

    ``database`` is a file path, ``":memory:"``, or an open :class:`SqliteWriter` to share
    (then the caller closes it; otherwise :meth:`close` does). ``own_key`` is this node's
    32-byte DHT id (used by the eviction policy); ``max_bytes`` caps stored record bytes.
    Raises :class:`~lattica.storage.StorageError` (``CorruptDatabaseError`` for a file that is
    not a Lattica database) when the database cannot be opened.
    """

    def __init__(
        self,
        database: str | Path | SqliteWriter,
        *,
        own_key: bytes,
        max_bytes: int = DEFAULT_MAX_STORE_BYTES,
    ) -> None:
        self.own_key = own_key
        self._own_int = key_to_int(own_key)
        self.max_bytes = max_bytes
        self._owns_writer = not isinstance(database, SqliteWriter)
        self.writer = database if isinstance(database, SqliteWriter) else SqliteWriter(database)
        try:
            self.writer.write_blocking(_create_schema)
            self._total_bytes = self.writer.read(_sum_sizes)
        except BaseException:
            if self._owns_writer:
                self.writer.close()
            raise
        self.writer.on_rollback(self._recount)

    def close(self) -> None:
        """Finish queued writes and close the database (idempotent)."""
        if self._owns_writer:
            self.writer.close()

    def _recount(self, conn: sqlite3.Connection) -> None:
        self._total_bytes = _sum_sizes(conn)

    @property
    def total_bytes(self) -> int:
        """Bytes currently counted against ``max_bytes``."""
        return self._total_bytes

    # -- records -----------------------------------------------------------------------------

    async def put_record(self, record: SignedRecord, *, own: bool = False) -> bool:
        """Store a validated record unless an equal or newer one is held; returns once committed.

        Returns True when stored, False when the identical record was already held. Raises
        :class:`StaleRecordError` when it is older than the held one, :class:`StoreFullError`
        when the size cap leaves no room, :class:`~lattica.storage.StorageError` when the
        database failed (nothing stored).
        """
        held = self._held_record(record.dht_key)
        # Decided without a commit when the committed state already settles it: held records
        # only ever get newer (or expire), so "stale" and "identical" stay true.
        if held is not None and not check_not_stale(record, held[0]) and (held[1] or not own):
            return False
        data = encode_record(record)
        return await self.writer.write(lambda conn: self._put_record(conn, record, data, own))

    def _held_record(self, dht_key: bytes) -> tuple[SignedRecord, bool] | None:
        row = self.writer.read(
            lambda c: c.execute("SELECT data, own FROM dht_records WHERE dht_key = ?", (dht_key,)).fetchone()
        )
        return (decode_record(row[0]), bool(row[1])) if row else None

    def _put_record(self, conn: sqlite3.Connection, record: SignedRecord, data: bytes, own: bool) -> bool:
        held_row = conn.execute(
            "SELECT data, own, size FROM dht_records WHERE dht_key = ?", (record.dht_key,)
        ).fetchone()
        held = decode_record(held_row[0]) if held_row else None
        if not check_not_stale(record, held):
            if own and not held_row[1]:
                conn.execute("UPDATE dht_records SET own = 1 WHERE dht_key = ?", (record.dht_key,))
            return False
        old_size = int(held_row[2]) if held_row else 0
        own = own or bool(held_row and held_row[1])
        freed = self._make_room(conn, record.dht_key, len(data) - old_size, own=own)
        conn.execute(
            "INSERT OR REPLACE INTO dht_records (dht_key, data, seq, expires_at, own, size) VALUES (?, ?, ?, ?, ?, ?)",
            (record.dht_key, data, record.seq, record.expires_at, int(own), len(data)),
        )
        self._total_bytes += len(data) - old_size - freed
        return True

    def get_record(self, dht_key: bytes, *, now: float) -> SignedRecord | None:
        """The unexpired record at ``dht_key``, if held."""
        row = self.writer.read(
            lambda c: c.execute(
                "SELECT data FROM dht_records WHERE dht_key = ? AND expires_at > ?", (dht_key, now)
            ).fetchone()
        )
        return decode_record(row[0]) if row else None

    def own_records(self, *, now: float) -> list[SignedRecord]:
        """Unexpired records this node wrote (republished periodically)."""
        rows = self.writer.read(
            lambda c: c.execute("SELECT data FROM dht_records WHERE own = 1 AND expires_at > ?", (now,)).fetchall()
        )
        return [decode_record(row[0]) for row in rows]

    def record_count(self) -> int:
        """Number of stored records (expired ones included until purged)."""
        (count,) = self.writer.read(lambda c: c.execute("SELECT COUNT(*) FROM dht_records").fetchone())
        return int(count)

    # -- provider records ----------------------------------------------------------------------

    async def add_provider(self, record: ProviderRecord) -> bool:
        """Store a validated provider record; a later ``expires_at`` replaces an earlier one.

        Returns True when stored (once committed), False when an equal or newer one for the
        same provider is held. Raises :class:`StoreFullError` when the size cap leaves no room,
        :class:`~lattica.storage.StorageError` when the database failed.
        """
        held_expiry = self._held_provider_expiry(record)
        if held_expiry is not None and held_expiry >= record.expires_at:
            return False
        data = encode_record(record)
        return await self.writer.write(lambda conn: self._add_provider(conn, record, data))

    def _held_provider_expiry(self, record: ProviderRecord) -> int | None:
        row = self.writer.read(
            lambda c: c.execute(
                "SELECT expires_at FROM dht_providers WHERE dht_key = ? AND provider = ?",
                (record.dht_key, record.provider),
            ).fetchone()
        )
        return int(row[0]) if row else None

    def _add_provider(self, conn: sqlite3.Connection, record: ProviderRecord, data: bytes) -> bool:
        row = conn.execute(
            "SELECT expires_at, size FROM dht_providers WHERE dht_key = ? AND provider = ?",
            (record.dht_key, record.provider),
        ).fetchone()
        if row and int(row[0]) >= record.expires_at:
            return False
        old_size = int(row[1]) if row else 0
        freed = self._make_room(conn, record.dht_key, len(data) - old_size, own=False)
        conn.execute(
            "INSERT OR REPLACE INTO dht_providers (dht_key, provider, data, expires_at, size) VALUES (?, ?, ?, ?, ?)",
            (record.dht_key, record.provider, data, record.expires_at, len(data)),
        )
        self._total_bytes += len(data) - old_size - freed
        return True

    def get_providers(self, dht_key: bytes, *, now: float, limit: int) -> list[ProviderRecord]:
        """Up to ``limit`` unexpired provider records at ``dht_key``, longest-lived first."""
        rows = self.writer.read(
            lambda c: c.execute(
                "SELECT data FROM dht_providers WHERE dht_key = ? AND expires_at > ? ORDER BY expires_at DESC LIMIT ?",
                (dht_key, now, limit),
            ).fetchall()
        )
        return [decode_provider_record(row[0]) for row in rows]

    async def add_provided(self, cid: bytes) -> None:
        """Remember that this node provides ``cid`` (republished until removed); once committed."""
        await self.writer.write(lambda c: c.execute("INSERT OR IGNORE INTO dht_provided (cid) VALUES (?)", (cid,)))

    async def remove_provided(self, cid: bytes) -> None:
        """Stop republishing ``cid``; returns once committed."""
        await self.writer.write(lambda c: c.execute("DELETE FROM dht_provided WHERE cid = ?", (cid,)))

    def provided(self) -> list[bytes]:
        """Content ids this node provides."""
        rows = self.writer.read(lambda c: c.execute("SELECT cid FROM dht_provided").fetchall())
        return [bytes(r[0]) for r in rows]

    # -- routing table -------------------------------------------------------------------------

    async def save_peers(self, peers: list[StoredPeer]) -> int:
        """Make the persisted routing table equal ``peers``; returns rows written or deleted.

        Incremental: only peers whose addresses or last-seen time changed are upserted and
        only peers no longer in the table are deleted (the diff is taken inside the write
        transaction, so concurrent saves cannot leave a stale row behind).
        """
        wanted = {p.peer_id.key: (msgspec.msgpack.encode(p.addresses), p.last_seen) for p in peers}
        return await self.writer.write(lambda conn: self._save_peers(conn, wanted))

    @staticmethod
    def _save_peers(conn: sqlite3.Connection, wanted: dict[bytes, tuple[bytes, float]]) -> int:
        held = {
            bytes(key): (bytes(addresses), float(last_seen))
            for key, addresses, last_seen in conn.execute("SELECT peer_id, addresses, last_seen FROM dht_peers")
        }
        gone = [(key,) for key in held if key not in wanted]
        changed = [(key, *row) for key, row in wanted.items() if held.get(key) != row]
        conn.executemany("DELETE FROM dht_peers WHERE peer_id = ?", gone)
        conn.executemany(
            "INSERT INTO dht_peers (peer_id, addresses, last_seen) VALUES (?, ?, ?)"
            " ON CONFLICT (peer_id) DO UPDATE SET addresses = excluded.addresses, last_seen = excluded.last_seen",
            changed,
        )
        return len(gone) + len(changed)

    def load_peers(self) -> list[StoredPeer]:
        """The persisted routing table, most recently seen first (damaged rows are skipped)."""
        query = "SELECT peer_id, addresses, last_seen FROM dht_peers ORDER BY last_seen DESC"
        rows = self.writer.read(lambda c: c.execute(query).fetchall())
        peers = []
        for key, addresses, last_seen in rows:
            try:
                decoded = _addresses_decoder.decode(addresses)
                peers.append(StoredPeer(PeerId(bytes(key)), list(decoded), float(last_seen)))
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
                continue
        return peers

    # -- expiry and size cap -------------------------------------------------------------------

    async def purge_expired(self, *, now: float) -> int:
        """Delete expired records and provider records; returns how many (once committed)."""
        return await self.writer.write(lambda conn: self._purge_expired(conn, now))

    def _purge_expired(self, conn: sqlite3.Connection, now: float) -> int:
        deleted = conn.execute("DELETE FROM dht_records WHERE expires_at <= ?", (now,)).rowcount
        deleted += conn.execute("DELETE FROM dht_providers WHERE expires_at <= ?", (now,)).rowcount
        if deleted:
            self._total_bytes = _sum_sizes(conn)
        return int(deleted)

    def _distance(self, dht_key: bytes) -> int:
        return int.from_bytes(dht_key, "big") ^ self._own_int

    def _make_room(self, conn: sqlite3.Connection, dht_key: bytes, extra_bytes: int, *, own: bool) -> int:
        """Inside a write: evict farther entries until ``extra_bytes`` more fit; bytes freed.

        Raises :class:`StoreFullError` (having changed nothing) when that is impossible. The
        caller subtracts the freed bytes from ``_total_bytes`` once its insert succeeded.
        """
        excess = self._total_bytes + extra_bytes - self.max_bytes
        if excess <= 0:
            return 0
        new_distance = self._distance(dht_key)
        candidates: list[tuple[int, str, bytes, bytes | None, int]] = []
        for key, size in conn.execute("SELECT dht_key, size FROM dht_records WHERE own = 0"):
            candidates.append((self._distance(key), "record", key, None, int(size)))
        for key, provider, size in conn.execute("SELECT dht_key, provider, size FROM dht_providers"):
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
                conn.execute("DELETE FROM dht_records WHERE dht_key = ?", (key,))
            else:
                conn.execute("DELETE FROM dht_providers WHERE dht_key = ? AND provider = ?", (key, provider))
        return freed
