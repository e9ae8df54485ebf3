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
  hold as well. Each row keeps its distance (32 big-endian bytes, which sqlite compares like
  the integer) under an index, so eviction reads only its victims, never the whole table.
* Writer quota: the bytes of other writers' records plus the provider records a provider
  signed stay at or below ``max_bytes_per_writer`` per writer (the record's ``writer``, the
  provider record's ``provider``); an insert beyond it is refused with
  :class:`WriterQuotaError`. One identity cannot fill the store or push honest records out by
  grinding keys near our id; our own records are not counted. Many identities still can, up to
  ``max_bytes``: docs/security.md says what bounds that.
* ``total_bytes`` and the per-writer byte counts are kept on the writer thread, changed only
  after a write's statements all succeeded, and recomputed from the tables after any rollback
  caused by an sqlite error.
* Storage failures raise :class:`~lattica.storage.StorageError` subclasses naming the file
  (``DiskFullError`` for a full disk, ``CorruptDatabaseError`` for a damaged file); the failed
  write is not stored, earlier ones are kept, reads go on.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from lattica.dht.errors import InvalidRecordError, StoreFullError, WriterQuotaError
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
DEFAULT_MAX_STORE_BYTES_PER_WRITER = 4 * 1024 * 1024

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
    "CREATE TABLE IF NOT EXISTS dht_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
]

# Added after the first release: databases written before get them on open (``_migrate``).
_ADDED_COLUMNS = {
    "dht_records": ("writer BLOB", "distance BLOB"),
    "dht_providers": ("distance BLOB",),
}
_INDEXES = [
    "CREATE INDEX IF NOT EXISTS dht_records_eviction ON dht_records(own, distance)",
    "CREATE INDEX IF NOT EXISTS dht_records_writer ON dht_records(writer)",
    "CREATE INDEX IF NOT EXISTS dht_providers_eviction ON dht_providers(distance)",
]

_addresses_decoder = msgspec.msgpack.Decoder(list[tuple[str, int]])


@dataclass(frozen=True)
class StoredPeer:
    """A routing-table entry as persisted: who, where, and when last heard from (unix s)."""

    peer_id: PeerId
    addresses: list[Address]
    last_seen: float


def _create_schema(conn: sqlite3.Connection, own_key: bytes) -> None:
    # Statement by statement: ``executescript`` would COMMIT the writer's open transaction.
    for statement in _SCHEMA:
        conn.execute(statement)
    for table, columns in _ADDED_COLUMNS.items():
        held = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in held:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    for statement in _INDEXES:
        conn.execute(statement)
    _fill_derived_columns(conn, own_key)


def _fill_derived_columns(conn: sqlite3.Connection, own_key: bytes) -> None:
    """Compute ``writer`` and ``distance`` where they are missing, and every distance again
    when the database was last opened under another node id (the eviction order is relative
    to our id)."""
    row = conn.execute("SELECT value FROM dht_meta WHERE name = 'own_key'").fetchone()
    everything = row is None or bytes(row[0]) != own_key
    where = "" if everything else " WHERE distance IS NULL OR writer IS NULL"
    own_int = key_to_int(own_key)
    records = conn.execute(f"SELECT dht_key, data FROM dht_records{where}").fetchall()
    updates = []
    for dht_key, data in records:
        try:
            writer = decode_record(data).writer
        except InvalidRecordError:
            writer = b""  # a damaged row: still evictable, counted under no real writer
        updates.append((writer, _distance_bytes(dht_key, own_int), dht_key))
    conn.executemany("UPDATE dht_records SET writer = ?, distance = ? WHERE dht_key = ?", updates)
    where = "" if everything else " WHERE distance IS NULL"
    keys = conn.execute(f"SELECT DISTINCT dht_key FROM dht_providers{where}").fetchall()
    conn.executemany(
        "UPDATE dht_providers SET distance = ? WHERE dht_key = ?",
        [(_distance_bytes(key, own_int), key) for (key,) in keys],
    )
    conn.execute("INSERT OR REPLACE INTO dht_meta (name, value) VALUES ('own_key', ?)", (own_key,))


def _distance_bytes(dht_key: bytes, own_int: int) -> bytes:
    """XOR distance as 32 big-endian bytes: sqlite compares BLOBs with memcmp, so ``ORDER BY``
    on it orders by distance."""
    return (key_to_int(dht_key) ^ own_int).to_bytes(32, "big")


def _bytes_per_writer(conn: sqlite3.Connection) -> dict[bytes, int]:
    totals: dict[bytes, int] = {}
    for writer, size in itertools.chain(
        conn.execute("SELECT writer, SUM(size) FROM dht_records WHERE own = 0 GROUP BY writer"),
        conn.execute("SELECT provider, SUM(size) FROM dht_providers GROUP BY provider"),
    ):
        key = bytes(writer or b"")
        totals[key] = totals.get(key, 0) + int(size)
    return totals


def _sum_sizes(conn: sqlite3.Connection) -> int:
    # Reads every row of both tables: at open this also finds a truncated file's missing pages.
    (records,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM dht_records").fetchone()
    (providers,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM dht_providers").fetchone()
    return int(records) + int(providers)


class DhtStore:
    """sqlite-backed storage for one node's DHT state (see the module docstring).

    ``database`` is a file path, ``":memory:"``, or an open :class:`SqliteWriter` to share
    (then the caller closes it; otherwise :meth:`close` does). ``own_key`` is this node's
    32-byte DHT id (used by the eviction policy); ``max_bytes`` caps stored record bytes and
    ``max_bytes_per_writer`` the bytes of any one other writer (module docstring). Raises
    :class:`~lattica.storage.StorageError` (``CorruptDatabaseError`` for a file that is not a
    Lattica database) when the database cannot be opened.
    """

    def __init__(
        self,
        database: str | Path | SqliteWriter,
        *,
        own_key: bytes,
        max_bytes: int = DEFAULT_MAX_STORE_BYTES,
        max_bytes_per_writer: int = DEFAULT_MAX_STORE_BYTES_PER_WRITER,
    ) -> None:
        self.own_key = own_key
        self._own_int = key_to_int(own_key)
        self.max_bytes = max_bytes
        self.max_bytes_per_writer = max_bytes_per_writer
        self._owns_writer = not isinstance(database, SqliteWriter)
        self.writer = database if isinstance(database, SqliteWriter) else SqliteWriter(database)
        try:
            self.writer.write_blocking(lambda conn: _create_schema(conn, own_key))
            self._total_bytes = self.writer.read(_sum_sizes)
            self._writer_bytes = self.writer.read(_bytes_per_writer)
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
        self._writer_bytes = _bytes_per_writer(conn)

    @property
    def total_bytes(self) -> int:
        """Bytes currently counted against ``max_bytes``."""
        return self._total_bytes

    def writer_bytes(self, writer: bytes) -> int:
        """Bytes of ``writer``'s records and provider records counted against its quota."""
        return self._writer_bytes.get(writer, 0)

    def _check_quota(self, writer: bytes, extra_bytes: int) -> None:
        held = self._writer_bytes.get(writer, 0)
        if extra_bytes > 0 and held + extra_bytes > self.max_bytes_per_writer:
            raise WriterQuotaError(
                f"writer {PeerId(writer) if len(writer) == 32 else writer.hex()} holds {held} bytes here;"
                f" {extra_bytes} more would pass the quota of {self.max_bytes_per_writer}"
            )

    def _count(self, writer: bytes, delta_bytes: int) -> None:
        total = self._writer_bytes.get(writer, 0) + delta_bytes
        if total > 0:
            self._writer_bytes[writer] = total
        else:
            self._writer_bytes.pop(writer, None)

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
                self._count(record.writer, -int(held_row[2]))
            return False
        old_size = int(held_row[2]) if held_row else 0
        was_own = bool(held_row and held_row[1])
        own = own or was_own
        # A record that becomes ours stops counting against its writer's quota.
        counted_before = old_size if held_row and not was_own else 0
        if not own:
            self._check_quota(record.writer, len(data) - counted_before)
        freed = self._make_room(conn, record.dht_key, len(data) - old_size, own=own)
        conn.execute(
            "INSERT OR REPLACE INTO dht_records (dht_key, data, seq, expires_at, own, size, writer, distance)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.dht_key,
                data,
                record.seq,
                record.expires_at,
                int(own),
                len(data),
                record.writer,
                _distance_bytes(record.dht_key, self._own_int),
            ),
        )
        self._total_bytes += len(data) - old_size - freed
        self._count(record.writer, (0 if own else len(data)) - counted_before)
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
        self._check_quota(record.provider, len(data) - old_size)
        freed = self._make_room(conn, record.dht_key, len(data) - old_size, own=False)
        conn.execute(
            "INSERT OR REPLACE INTO dht_providers (dht_key, provider, data, expires_at, size, distance)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.dht_key,
                record.provider,
                data,
                record.expires_at,
                len(data),
                _distance_bytes(record.dht_key, self._own_int),
            ),
        )
        self._total_bytes += len(data) - old_size - freed
        self._count(record.provider, len(data) - old_size)
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
            self._recount(conn)
        return int(deleted)

    def _make_room(self, conn: sqlite3.Connection, dht_key: bytes, extra_bytes: int, *, own: bool) -> int:
        """Inside a write: evict farther entries until ``extra_bytes`` more fit; bytes freed.

        Raises :class:`StoreFullError` (having changed nothing) when that is impossible. The
        caller subtracts the freed bytes from ``_total_bytes`` once its insert succeeded (the
        victims' writers are uncounted here: a later failure rolls back and recounts).
        """
        excess = self._total_bytes + extra_bytes - self.max_bytes
        if excess <= 0:
            return 0
        new_distance = _distance_bytes(dht_key, self._own_int)
        victims: list[_Victim] = []
        freed = 0
        records = conn.execute(
            "SELECT distance, dht_key, writer, size FROM dht_records WHERE own = 0 ORDER BY distance DESC"
        )
        providers = conn.execute("SELECT distance, dht_key, provider, size FROM dht_providers ORDER BY distance DESC")
        try:
            for victim in _farthest_first(records, providers):
                if freed >= excess:
                    break
                if victim.dht_key == dht_key:
                    continue
                if victim.distance <= new_distance and not own:
                    break
                victims.append(victim)
                freed += victim.size
        finally:
            # Finished statements before the DELETEs: no read is left open on the rows they change.
            records.close()
            providers.close()
        if freed < excess:
            raise StoreFullError(
                f"DHT store is full ({self._total_bytes} of {self.max_bytes} bytes) "
                "and holds nothing farther from our id to evict"
            )
        for victim in victims:
            if victim.provider is None:
                conn.execute("DELETE FROM dht_records WHERE dht_key = ?", (victim.dht_key,))
            else:
                conn.execute(
                    "DELETE FROM dht_providers WHERE dht_key = ? AND provider = ?", (victim.dht_key, victim.provider)
                )
            self._count(victim.writer, -victim.size)
        return freed


def _farthest_first(records: sqlite3.Cursor, providers: sqlite3.Cursor) -> Iterator[_Victim]:
    """Merge the two distance-ordered cursors (others' records; provider records) into one
    stream, farthest from our id first: read lazily through the distance indexes."""
    return heapq.merge(
        (_Victim(bytes(d), bytes(k), None, bytes(w or b""), int(n)) for d, k, w, n in records),
        (_Victim(bytes(d), bytes(k), bytes(p), bytes(p), int(n)) for d, k, p, n in providers),
        key=lambda victim: victim.distance,
        reverse=True,
    )


@dataclass(frozen=True, slots=True)
class _Victim:
    distance: bytes
    dht_key: bytes
    provider: bytes | None  # None: a record
    writer: bytes
    size: int
