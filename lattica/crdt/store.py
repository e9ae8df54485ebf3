"""The per-node log of accepted envelopes, snapshots and held spaces (sqlite).

Durability: every write goes through the node's :class:`~lattica.storage.SqliteWriter` (WAL,
``synchronous=FULL``, group commit on its worker thread). ``append`` returns only after the
COMMIT holding the envelopes, so a ``set`` that returned survives ``kill -9``.

Compaction policy: a snapshot (the full encoded Yrs state plus the version vector it reflects)
is rewritten every ``compact_every_updates`` accepted updates, so a restart applies the snapshot
and only the updates after it. Envelopes themselves are *kept*: they are the only thing a
replica can hand a joining peer that the peer can verify (a snapshot is nobody's signed
statement), so the log is bounded by ``crdt.max_space_bytes`` per space instead.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import msgspec

from lattica.crdt.envelope import Envelope, encode_envelope
from lattica.crdt.space_id import Genesis, SpaceId, encode_genesis
from lattica.storage import SqliteWriter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS crdt_spaces (space_id BLOB PRIMARY KEY, genesis BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS crdt_envelopes (
    space_id BLOB NOT NULL, author BLOB NOT NULL, seq INTEGER NOT NULL, envelope BLOB NOT NULL,
    PRIMARY KEY (space_id, author, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS crdt_snapshots (
    space_id BLOB PRIMARY KEY, state BLOB NOT NULL, version_vector BLOB NOT NULL
);
"""


def _create_schema(conn: sqlite3.Connection) -> None:
    # executescript() would COMMIT the writer's transaction: one statement at a time instead.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


_vv_encoder = msgspec.msgpack.Encoder()
_vv_decoder = msgspec.msgpack.Decoder(list[tuple[bytes, int]])


@dataclass(frozen=True)
class StoredSpace:
    """One space as read back at start-up."""

    genesis: bytes
    envelopes: list[bytes]
    snapshot: bytes | None
    snapshot_vv: dict[bytes, int]


class SpaceStore:
    """Spaces, envelopes and snapshots in the node's database (see the module docstring).

    Raises :class:`~lattica.storage.StorageError` from every method when sqlite fails.
    """

    def __init__(self, writer: SqliteWriter) -> None:
        self.writer = writer
        writer.write_blocking(_create_schema)

    async def add_space(self, genesis: Genesis) -> None:
        """Remember a space (idempotent)."""
        row = (genesis.space_id.key, encode_genesis(genesis))
        await self.writer.write(lambda c: c.execute("INSERT OR IGNORE INTO crdt_spaces VALUES (?, ?)", row) and None)

    async def append(self, space: SpaceId, envelopes: list[Envelope]) -> None:
        """Store accepted envelopes; returns after their COMMIT."""
        rows = [(space.key, e.author, e.seq, encode_envelope(e)) for e in envelopes]

        def insert(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR REPLACE INTO crdt_envelopes VALUES (?, ?, ?, ?)", rows)

        await self.writer.write(insert)

    async def remove_after(self, space: SpaceId, author: bytes, after_seq: int) -> None:
        """Delete ``author``'s envelopes above ``after_seq`` (a revoke cut them) and the
        snapshot, which may contain their effects."""

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM crdt_envelopes WHERE space_id = ? AND author = ? AND seq > ?",
                (space.key, author, after_seq),
            )
            conn.execute("DELETE FROM crdt_snapshots WHERE space_id = ?", (space.key,))

        await self.writer.write(delete)

    async def save_snapshot(self, space: SpaceId, state: bytes, version_vector: dict[bytes, int]) -> None:
        """Replace the space's snapshot (compaction)."""
        row = (space.key, state, _vv_encoder.encode(sorted(version_vector.items())))
        await self.writer.write(
            lambda c: c.execute("INSERT OR REPLACE INTO crdt_snapshots VALUES (?, ?, ?)", row) and None
        )

    def load(self) -> list[StoredSpace]:
        """Every stored space with its envelopes (author, seq order) and snapshot."""

        def read(conn: sqlite3.Connection) -> list[StoredSpace]:
            spaces = []
            for space_id, genesis in conn.execute("SELECT space_id, genesis FROM crdt_spaces").fetchall():
                envelopes = [
                    row[0]
                    for row in conn.execute(
                        "SELECT envelope FROM crdt_envelopes WHERE space_id = ? ORDER BY author, seq", (space_id,)
                    )
                ]
                snap = conn.execute(
                    "SELECT state, version_vector FROM crdt_snapshots WHERE space_id = ?", (space_id,)
                ).fetchone()
                vv = dict(_vv_decoder.decode(snap[1])) if snap else {}
                spaces.append(StoredSpace(genesis, envelopes, snap[0] if snap else None, vv))
            return spaces

        return self.writer.read(read)
