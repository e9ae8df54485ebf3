"""The block store: chunk bytes in files under ``<home>/blocks``, the index in sqlite.

Layout: ``blocks/<first 2 hex of digest>/<64 hex digest>`` (256 fan-out directories), temporary
files in ``blocks/tmp/``. The index (tables ``content_blocks``, ``content_roots``,
``content_refs``) lives in the database of the :class:`~lattica.storage.SqliteWriter` it is
given (the node's ``lattica.db``) and is written only through it, never on the trio thread.

Invariants:

* **Verified before stored.** A chunk is hashed before anything is written; bytes that do not
  hash to the digest they were offered under raise
  :class:`~lattica.content.errors.ChunkMismatchError` and leave no trace.
* **Atomic files.** A block is written to ``tmp/``, fsynced, renamed to its final name and
  its directory fsynced; a crash leaves either the whole block or no block under the final
  name (a stray temporary file at worst, removed by :meth:`BlockStore.gc`). Bulk writers may
  skip the per-file fsyncs and flush a batch with one :func:`sync_filesystem` before indexing
  it; until then such a file is an unindexed orphan whatever a crash left in it.
* **File, then index.** A block is indexed (acknowledged) only after its file is in place, so
  the index never names a block that was not written; a file without an index row is an orphan
  that :meth:`BlockStore.gc` removes. Something that damages files afterwards is found by
  :meth:`BlockStore.verify`.
* **Disk full** (``ENOSPC``/``EDQUOT``) raises :class:`~lattica.storage.DiskFullError` naming
  the path; the temporary file is removed and every block stored before is kept.
* **Roots** are manifests (their own bytes are a block too); ``content_refs`` lists the chunks
  each root references. ``gc`` removes unpinned roots, then every block no remaining root
  references. ``put``/``add_root`` and ``gc`` exclude each other (one ``trio.Lock``), so a
  block being stored is never collected half-way.
* Reads never load more than the range asked for (at most one chunk).

**Extents: chunks that are ranges of fetched files.** A fetch into a folder writes each
chunk once, into the file it belongs to (:mod:`lattica.content.file_assembly`); that file is
hard-linked into ``blocks/files/`` (:meth:`BlockStore.adopt_file`) and its chunks are indexed
as ``(file, offset)`` ranges of it (table ``content_extents``) instead of being written a
second time as block files. The output file and the store share one inode, so the bytes can
change under the store (a user edits the fetched file in place): every read of a whole extent
is hashed again and one that no longer matches is dropped from the index (so it counts as
absent and is fetched again) and never served. Nothing here ever writes to, truncates or
deletes the user's name of such a file; ``gc`` only unlinks the store's own name once no
extent refers to it. Where the output folder is on another file system the link fails and
the chunks are stored as block files as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import logging
import os
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import blake3
import trio

from lattica.content.blocking_io import run_blocking
from lattica.content.chunk_ranges import iter_range
from lattica.content.cid import Cid, blake3_digest
from lattica.content.errors import ChunkMismatchError, ChunkNotFoundError, ContentTooLargeError
from lattica.content.manifest import (
    DEFAULT_MAX_MANIFEST_BYTES,
    MAX_CHUNK_BYTES,
    ChunkRef,
    FileEntry,
    Manifest,
    decode_manifest,
)
from lattica.storage import DiskFullError, SqliteWriter

log = logging.getLogger(__name__)

TMP_DIR = "tmp"
FILES_DIR = "files"
MAX_EXTENT_BYTES = 1 << 20
"""Longest chunk held as an extent; longer ones are block files. Serving reads a block in steps
of this size and must send exactly the bytes it hashed: a longer range of a user's file could
change between the hash and a later step (review finding), and a peer asking for a 64 MiB
extent and cancelling would cost a 64 MiB hash for one piece sent."""
_READ_PIECE_BYTES = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS content_blocks (
    digest BLOB PRIMARY KEY,
    length INTEGER NOT NULL,
    added_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS content_roots (
    cid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    total_bytes INTEGER NOT NULL,
    chunk_bytes INTEGER NOT NULL,
    pinned INTEGER NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS content_refs (
    root TEXT NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (root, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS content_refs_by_digest ON content_refs (digest);
CREATE TABLE IF NOT EXISTS content_extents (
    digest BLOB PRIMARY KEY,
    file TEXT NOT NULL,
    offset INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS content_extents_by_file ON content_extents (file);
CREATE TABLE IF NOT EXISTS content_dropped (
    digest BLOB PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS content_failed (
    cid TEXT PRIMARY KEY,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class RootInfo:
    """A manifest held by this store: ``total_bytes`` of its files, ``chunk_bytes`` of its
    distinct chunks (less than ``total_bytes`` when files share chunks), ``held_bytes`` of
    those chunks stored here, and whether it is pinned."""

    cid: Cid
    name: str
    total_bytes: int
    chunk_bytes: int
    held_bytes: int
    pinned: bool
    failed: str | None = None
    """Why this root is known bad (a file whose bytes do not hash to the manifest's
    SHA-256), or ``None``. A failed root is unpinned and never announced."""

    @property
    def complete(self) -> bool:
        """Whether every chunk of the manifest is stored here."""
        return self.held_bytes == self.chunk_bytes


@dataclass(frozen=True)
class Extent:
    """A verified chunk held as bytes ``[offset, offset + length)`` of the file ``file`` in
    ``blocks/files/`` (a name :meth:`BlockStore.adopt_file` gave), to be indexed by
    :meth:`BlockStore.index_written`."""

    digest: bytes
    length: int
    file: str
    offset: int


@dataclass(frozen=True)
class _Location:
    length: int
    path: Path
    start: int
    extent: bool


@dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`BlockStore.verify`: digests whose file is ``missing`` or whose bytes no
    longer hash to them (``bad``); ``dropped`` says whether those were removed from the index
    (so they count as absent and are fetched again)."""

    checked: int
    bad: tuple[bytes, ...]
    missing: tuple[bytes, ...]
    dropped: bool

    @property
    def ok(self) -> bool:
        """Whether every checked block is present and intact."""
        return not self.bad and not self.missing


@dataclass(frozen=True)
class BatchPutResult:
    """Result of :meth:`BlockStore.put_many`: digests now stored (new or already held), and
    digests whose offered bytes did not hash to them (nothing of those was written)."""

    stored: tuple[bytes, ...]
    rejected: tuple[bytes, ...]


@dataclass(frozen=True)
class GcReport:
    """Result of :meth:`BlockStore.gc`: unpinned roots dropped, blocks and bytes freed, and
    orphan files (no index row: a crash between file and index) removed."""

    roots_removed: int
    blocks_removed: int
    bytes_freed: int
    orphans_removed: int


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(path: Path, exc: OSError) -> DiskFullError:
    return DiskFullError(
        f"{path}: disk full ({exc.strerror}); nothing stored before was lost: free some space",
        path=str(path),
        cause=exc.strerror or "ENOSPC",
    )


def write_file_atomically(
    final: Path, pieces: Iterable[bytes | memoryview], tmp_dir: Path, *, durable: bool = True
) -> None:
    """Write ``pieces`` to a temporary file in ``tmp_dir`` (same file system), fsync it, rename
    it to ``final`` and fsync ``final``'s directory; on any failure nothing is left under
    ``final`` or in ``tmp_dir``. With ``durable=False`` both fsyncs are left to a later
    :func:`sync_filesystem` (bulk writers: one flush for many files). Raises
    :class:`~lattica.storage.DiskFullError` (naming the path) when the disk is full, ``OSError``
    otherwise."""
    fd, tmp_name = _mkstemp(tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in pieces:
                out.write(piece)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp_name, final)
        if durable:
            _fsync_directory(final.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if _is_disk_full(exc):
            raise _disk_full(final, exc) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def sync_filesystem(path: Path) -> None:
    """Flush everything written to the file system holding ``path`` to disk (Linux
    ``syncfs(2)``: one journal commit for a whole batch of files; elsewhere ``sync(2)``).

    Why: an fsync per 1 MiB block (file and directory) cost ~13 ms on this machine's disk, and
    one ``syncfs`` after a batch ~7 ms per block (``docs/decisions.md``). Raises
    :class:`~lattica.storage.DiskFullError` or ``OSError`` when the kernel reports a write-back
    error."""
    if _libc is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            exc = OSError(code, os.strerror(code), str(path))
            if _is_disk_full(exc):
                raise _disk_full(path, exc)
            raise exc
    finally:
        os.close(fd)


# What makes a stored block's file unreadable for good (gone, a user's chmod of a fetched file
# held as extents, a folder or symlink put there): the block counts as missing and is fetched
# again. Transient errors (EMFILE, EIO) are raised as they are.
_UNREADABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _digests_in(table: str, wanted: Sequence[bytes], conn: sqlite3.Connection) -> set[bytes]:
    """The digests of ``wanted`` that have a row in ``table`` (one of ours), 500 per query."""
    found: set[bytes] = set()
    for start in range(0, len(wanted), 500):
        batch = wanted[start : start + 500]
        marks = ",".join("?" * len(batch))
        rows = conn.execute(f"SELECT digest FROM {table} WHERE digest IN ({marks})", batch)
        found.update(row[0] for row in rows)
    return found


def _open_for_reading(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink planted in the store: never followed
            raise NotADirectoryError(errno.ENOTDIR, "a symlink, not followed", str(path)) from None
        raise


def _mkstemp(tmp_dir: Path) -> tuple[int, str]:
    return tempfile.mkstemp(dir=tmp_dir, prefix=".lattica-", suffix=".tmp")


class BlockStore:
    """Chunks and manifests of a node (see the module docstring for the rules).

    ``root`` is the blocks directory (created, mode 0700); ``db`` the writer of the database
    holding the index (the schema is created on it). ``max_chunk_bytes`` bounds a stored chunk,
    ``max_manifest_bytes`` a stored manifest. Raises ``OSError`` if ``root`` cannot be created
    and :class:`~lattica.storage.StorageError` if the schema cannot be written.
    """

    def __init__(
        self,
        root: Path,
        db: SqliteWriter,
        *,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
    ) -> None:
        self.root = Path(root)
        self.db = db
        self.max_chunk_bytes = max_chunk_bytes
        self.max_manifest_bytes = max_manifest_bytes
        self.tmp_dir = self.root / TMP_DIR
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.files_dir = self.root / FILES_DIR
        self.files_dir.mkdir(exist_ok=True, mode=0o700)
        self._lock = trio.Lock()
        self._fanout_ready: set[str] = set()
        # Blocks written but not indexed yet (write_unindexed .. index_written), per digest a
        # count of writers; orphan removal skips them. Read and written on worker threads.
        self._unindexed: dict[bytes, int] = {}
        self._unindexed_lock = threading.Lock()
        # Fetches running per root: (how many, whether the root was pinned before the first).
        self._fetching: dict[Cid, tuple[int, bool]] = {}
        # Blocks a publish indexed before its root exists (counts; trio thread only): gc keeps them.
        self._protected: dict[bytes, int] = {}
        # write_unindexed calls running (under _unindexed_lock): their temporary files are live.
        self._unlocked_writers = 0
        # Files in files/ that running fetches are writing (adopt_file .. release_files), per
        # name a count: their extents are not indexed yet, so orphan removal must skip them.
        self._live_files: dict[str, int] = {}
        db.write_blocking(self._create_schema)
        # No fetch runs yet: a name in files/ no extent refers to is what a killed fetch or
        # publish left (review finding: a kill -9 left a fallocated file of the full size).
        self._unlink_files(self._unreferenced_files())

    def _unreferenced_files(self) -> list[str]:
        names = [entry.name for entry in os.scandir(self.files_dir)]
        if not names:
            return []
        referenced = self.db.read(partial(self._referenced_files, names))
        return [name for name in names if name not in referenced]

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        # One statement at a time: executescript() would COMMIT the writer's transaction.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)

    # -- paths and reads -------------------------------------------------------------------------

    def block_path(self, digest: bytes) -> Path:
        """Where the block with this digest lives (whether or not it is stored)."""
        name = digest.hex()
        return self.root / name[:2] / name

    def has(self, digest: bytes) -> bool:
        """Whether the block is indexed (stored and verified when it was written)."""
        row = self.db.read(lambda c: c.execute("SELECT 1 FROM content_blocks WHERE digest = ?", (digest,)).fetchone())
        return row is not None

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        """The digests of ``digests`` that are not stored, in the order given, without repeats."""
        wanted = list(dict.fromkeys(digests))
        present = self.db.read(partial(_digests_in, "content_blocks", wanted))
        return [d for d in wanted if d not in present]

    def dropped(self, digests: Iterable[bytes]) -> set[bytes]:
        """The digests of ``digests`` this store held once and dropped because their bytes
        changed or went (on a read, or by :meth:`verify`), not stored again since: a repair
        fetches them, unlike chunks a partial fetch never asked for."""
        return self.db.read(partial(_digests_in, "content_dropped", list(dict.fromkeys(digests))))

    def block_length(self, digest: bytes) -> int:
        """Size of a stored block; raises :class:`ChunkNotFoundError`."""
        row = self.db.read(
            lambda c: c.execute("SELECT length FROM content_blocks WHERE digest = ?", (digest,)).fetchone()
        )
        if row is None:
            raise ChunkNotFoundError(f"block {digest.hex()} is not stored")
        return int(row[0])

    def _location(self, digest: bytes) -> _Location:
        query = (
            "SELECT b.length, e.file, e.offset FROM content_blocks b"
            " LEFT JOIN content_extents e ON e.digest = b.digest WHERE b.digest = ?"
        )
        row = self.db.read(lambda c: c.execute(query, (digest,)).fetchone())
        if row is None:
            raise ChunkNotFoundError(f"block {digest.hex()} is not stored")
        length, file, start = row
        if file is None:
            return _Location(int(length), self.block_path(digest), 0, False)
        return _Location(int(length), self.files_dir / file, int(start), True)

    def _pread(self, digest: bytes, where: _Location, offset: int, length: int) -> bytes:
        try:
            fd = _open_for_reading(where.path)
        except _UNREADABLE as exc:
            raise ChunkNotFoundError(
                f"block {digest.hex()} is indexed but its file cannot be read ({exc.strerror}); run verify"
            ) from None
        try:
            data = os.pread(fd, length, where.start + offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise ChunkNotFoundError(f"block {digest.hex()} is shorter on disk than indexed; run verify")
        return data

    def _read_extent(self, digest: bytes, where: _Location) -> bytes:
        """A whole extent, hashed again: the file it lies in is also a user's file."""
        try:
            data = self._pread(digest, where, 0, where.length)
        except ChunkNotFoundError:
            self._drop_changed(digest, where)
            raise
        if blake3_digest(data) != digest:
            self._drop_changed(digest, where)
            raise ChunkNotFoundError(
                f"block {digest.hex()} changed on disk since it was stored (its fetched file was"
                " edited?); dropped from the index, fetch the content again"
            )
        return data

    def _drop_changed(self, digest: bytes, where: _Location) -> None:
        """Unindex an extent whose bytes changed or went (blocking; called on worker threads),
        unless the index has moved it elsewhere meanwhile (a later fetch of the same file)."""
        log.warning("block %s changed on disk since it was stored; dropped from the index", digest.hex())
        file = where.path.name

        def delete(conn: sqlite3.Connection) -> None:
            query = "DELETE FROM content_extents WHERE digest = ? AND file = ? AND offset = ?"
            if conn.execute(query, (digest, file, where.start)).rowcount:
                conn.execute("DELETE FROM content_blocks WHERE digest = ?", (digest,))
                conn.execute("INSERT OR IGNORE INTO content_dropped (digest) VALUES (?)", (digest,))

        self.db.write_blocking(delete)

    def open_block(self, digest: bytes) -> BinaryIO:
        """The stored block as a file opened for reading (streamed reads); the caller closes it.
        A block held as an extent comes as an in-memory copy, checked (at most one chunk).
        Raises :class:`ChunkNotFoundError` when it is not indexed or its file is gone."""
        where = self._location(digest)
        if where.extent:
            return io.BytesIO(self._read_extent(digest, where))
        try:
            return where.path.open("rb")
        except FileNotFoundError:
            raise ChunkNotFoundError(f"block {digest.hex()} is indexed but its file is missing; run verify") from None

    def read_block(self, digest: bytes, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of a stored block from ``offset`` (to its end when ``None``), read
        from disk on this thread (use :meth:`read` from trio). A block held as an extent is
        read whole and hashed again first (dropped and not found when it changed).
        Raises :class:`ChunkNotFoundError`, or ``ValueError`` for a range outside the block."""
        where = self._location(digest)
        end = where.length if length is None else offset + length
        if not 0 <= offset <= end <= where.length:
            raise ValueError(f"range [{offset}, {end}) is outside block {digest.hex()} ({where.length} bytes)")
        if where.extent:
            data = self._read_extent(digest, where)
            return data if (offset, end) == (0, where.length) else data[offset:end]
        return self._pread(digest, where, offset, end - offset)

    def read_start(self, digest: bytes, max_bytes: int) -> tuple[int, bytes]:
        """A stored block's length and its first ``max_bytes`` bytes, with one index lookup
        (serving reads the next block ahead this way). A block held as an extent is read whole
        and hashed: the bytes returned are the bytes checked, and a changed one is dropped from
        the index and raises; callers pass ``max_bytes >= MAX_EXTENT_BYTES``. Blocking. Raises
        :class:`ChunkNotFoundError` when it is not indexed, its file is gone, shorter or
        unreadable, or its extent changed; ``ValueError`` for an extent longer than
        ``max_bytes``."""
        where = self._location(digest)
        if where.extent:
            if where.length > max_bytes:
                raise ValueError(f"extent of {where.length} bytes read in steps of {max_bytes}: unchecked bytes")
            return where.length, self._read_extent(digest, where)
        return where.length, self._pread(digest, where, 0, min(max_bytes, where.length))

    async def read(self, digest: bytes, offset: int = 0, length: int | None = None) -> bytes:
        """:meth:`read_block` off the event loop."""
        return await run_blocking(lambda: self.read_block(digest, offset, length))

    def iter_file(self, chunks: Sequence[ChunkRef], start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of a file whose chunk list is ``chunks``, one piece per chunk
        (blocking reads: use from a worker thread for large ranges). Raises
        :class:`ChunkNotFoundError` at the first chunk that is not stored."""
        size = chunks[-1].offset + chunks[-1].length if chunks else 0
        return iter_range(chunks, start, size if end is None else end, self.read_block)

    # -- writes ----------------------------------------------------------------------------------

    def write_block_file(self, digest: bytes, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Write a block's file atomically, on this thread, for ``data`` the caller has already
        hashed to ``digest``; it is not indexed until :meth:`index_blocks`. For bulk writers on
        a worker thread holding :meth:`writing` (publishing), which pass ``durable=False`` and
        call :meth:`sync_to_disk` once before indexing the batch; others use :meth:`put`.
        Raises :class:`~lattica.storage.DiskFullError` and ``OSError``."""
        path = self.block_path(digest)
        if path.parent.name not in self._fanout_ready:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            self._fanout_ready.add(path.parent.name)
        write_file_atomically(path, [data], self.tmp_dir, durable=durable)

    def sync_to_disk(self) -> None:
        """Make every block file written with ``durable=False`` durable (blocking: one
        :func:`sync_filesystem` of the blocks directory). Call before :meth:`index_blocks`."""
        sync_filesystem(self.root)

    async def put(self, data: bytes | memoryview, digest: bytes | None = None) -> bytes:
        """Store one chunk; returns its BLAKE3 digest. With ``digest`` the bytes must hash to it
        (a chunk from a peer), else :class:`ChunkMismatchError` and nothing is written.

        Returns once the block is on disk and indexed (committed). A block already stored is
        not written again. Raises :class:`ContentTooLargeError` above ``max_chunk_bytes``,
        :class:`~lattica.storage.DiskFullError` when the disk is full, ``OSError`` and
        :class:`~lattica.storage.StorageError` for other failures."""
        if len(data) > self.max_chunk_bytes:
            raise ContentTooLargeError(f"chunk of {len(data)} bytes exceeds the cap of {self.max_chunk_bytes}")
        actual = await run_blocking(lambda: blake3_digest(data))
        if digest is not None and actual != digest:
            raise ChunkMismatchError(f"chunk offered as {digest.hex()} hashes to {actual.hex()}; not stored")
        await self._store_verified(actual, data)
        return actual

    async def put_many(self, chunks: Sequence[tuple[bytes | memoryview, bytes]]) -> BatchPutResult:
        """Store several chunks offered as ``(data, digest)`` pairs (e.g. a batch received
        from peers) with one flush to disk and one index transaction for all of them.

        Each chunk is verified on its own: one whose bytes do not hash to its digest is
        rejected (reported, not written) and the others are still stored. Returns once the
        stored ones are on disk and indexed. Raises :class:`ContentTooLargeError` (before
        anything is written), :class:`~lattica.storage.DiskFullError` (blocks written before
        the full disk are kept as unindexed orphans; none of the batch is acknowledged),
        ``OSError`` and :class:`~lattica.storage.StorageError`."""
        for data, _ in chunks:
            if len(data) > self.max_chunk_bytes:
                raise ContentTooLargeError(f"chunk of {len(data)} bytes exceeds the cap of {self.max_chunk_bytes}")

        def write_all() -> tuple[list[bytes], list[bytes], list[tuple[bytes, int]]]:
            stored: list[bytes] = []
            rejected: list[bytes] = []
            verified: list[tuple[bytes | memoryview, bytes]] = []
            for data, digest in chunks:
                if blake3_digest(data) != digest:
                    rejected.append(digest)
                    continue
                stored.append(digest)
                verified.append((data, digest))
            return stored, rejected, self.write_unindexed(verified)

        async with self._lock:
            stored, rejected, written = await run_blocking(write_all)
            await self.index_written(written)
        return BatchPutResult(tuple(stored), tuple(rejected))

    def write_unindexed(self, chunks: Sequence[tuple[bytes | memoryview, bytes]]) -> list[tuple[bytes, int]]:
        """Write the files of verified chunks (``(data, digest)``, each already hashed to its
        digest by the caller) that are not stored yet, without flushing them to disk and
        without indexing them; returns ``(digest, length)`` of the files written, which the
        caller must pass to :meth:`index_written` (also after an error). Blocking: call it
        on a worker thread. Until then :meth:`gc` leaves them alone, and after a crash they
        are unindexed orphans (a later fetch writes them again).

        For bulk writers that flush many batches at once: a fetch writes a batch at a time
        while the transfer goes on and makes them durable every ``fetch_sync_bytes``. Raises
        :class:`ContentTooLargeError` (before anything is written),
        :class:`~lattica.storage.DiskFullError` and ``OSError``."""
        for data, _ in chunks:
            if len(data) > self.max_chunk_bytes:
                raise ContentTooLargeError(f"chunk of {len(data)} bytes exceeds the cap of {self.max_chunk_bytes}")
        absent = set(self.missing(digest for _data, digest in chunks))  # one query, not one per chunk
        written: list[tuple[bytes, int]] = []
        with self._unindexed_lock:
            self._unlocked_writers += 1
        try:
            for data, digest in chunks:
                if digest not in absent:
                    continue
                absent.discard(digest)
                with self._unindexed_lock:  # before the file exists: gc must never see it unclaimed
                    self._unindexed[digest] = self._unindexed.get(digest, 0) + 1
                written.append((digest, len(data)))
                self.write_block_file(digest, data, durable=False)
        except BaseException:
            self._release([digest for digest, _ in written])  # orphans now, for gc to remove
            raise
        finally:
            with self._unindexed_lock:
                self._unlocked_writers -= 1
        return written

    async def index_written(self, blocks: Sequence[tuple[bytes, int]], extents: Sequence[Extent] = ()) -> None:
        """Flush the files :meth:`write_unindexed` wrote, and the files of ``extents``, to disk
        (one :func:`sync_filesystem`) and index them in one transaction: from then on they are
        stored. Releases the blocks whatever happens.

        ``extents`` are verified chunks written into files :meth:`adopt_file` linked here; an
        extent replaces the place a block had before (a refetched file holds all its chunks
        again), and a file in ``files/`` no extent refers to any more, and no fetch is writing,
        loses the store's name at once. Raises :class:`~lattica.storage.DiskFullError`,
        ``OSError`` and :class:`~lattica.storage.StorageError`."""
        try:
            if blocks or extents:
                await run_blocking(self.sync_to_disk)
            if blocks:
                await self.index_blocks(blocks)
            if extents:
                unreferenced = await self.db.write(partial(self._insert_extents, extents, time.time()))
                await run_blocking(partial(self._unlink_files, unreferenced))
        finally:
            self._release([digest for digest, _ in blocks])

    @staticmethod
    def _insert_extents(extents: Sequence[Extent], now: float, conn: sqlite3.Connection) -> list[str]:
        # The files the re-pointed chunks were in: one query per 500, not one per chunk.
        placed = {e.digest: e.file for e in extents}
        wanted = list(placed)
        before: set[str] = set()
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            query = f"SELECT digest, file FROM content_extents WHERE digest IN ({','.join('?' * len(batch))})"
            before.update(file for digest, file in conn.execute(query, batch) if file != placed[digest])
        conn.executemany(
            "INSERT OR IGNORE INTO content_blocks (digest, length, added_at) VALUES (?, ?, ?)",
            ((e.digest, e.length, now) for e in extents),
        )
        conn.executemany(
            "INSERT OR REPLACE INTO content_extents (digest, file, offset) VALUES (?, ?, ?)",
            ((e.digest, e.file, e.offset) for e in extents),
        )
        conn.executemany("DELETE FROM content_dropped WHERE digest = ?", ((d,) for d in placed))
        query = "SELECT 1 FROM content_extents WHERE file = ? LIMIT 1"
        return [name for name in sorted(before) if conn.execute(query, (name,)).fetchone() is None]

    def _unlink_files(self, names: Iterable[str]) -> None:
        for name in names:
            with self._unindexed_lock:
                if name in self._live_files:
                    continue
            with contextlib.suppress(FileNotFoundError):
                (self.files_dir / name).unlink()

    def adopt_file(self, fd: int) -> str | None:
        """Give the open regular file ``fd`` (a fetched file being written) a second name in
        ``files/`` (a hard link, through ``/proc/self/fd``) so its chunks can be indexed as
        :class:`Extent` s of it; returns that name, or ``None`` when the file cannot be linked
        here (another file system, no ``/proc``, a file another user owns): its chunks are then
        stored as block files.
        The name counts as live (kept by ``gc``) until :meth:`release_files`. Blocking."""
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                # Another user's file (root may link it): a link would keep their bytes on their
                # disk or quota after they delete it, until this node's gc. Copy instead.
                return None
        except OSError:
            return None
        name = secrets.token_hex(16)
        with self._unindexed_lock:
            self._live_files[name] = self._live_files.get(name, 0) + 1
        try:
            # With a directory descriptor os.link calls linkat(AT_SYMLINK_FOLLOW), which follows
            # the /proc magic link to the open file; plain link() would link the symlink itself.
            files_fd = os.open(self.files_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=files_fd, follow_symlinks=True)
            finally:
                os.close(files_fd)
        except OSError as exc:
            self.release_files([name])
            log.debug("fetched file not linked into the store (%s): chunks go to block files", exc.strerror)
            return None
        return name

    def release_files(self, names: Iterable[str]) -> None:
        """Undo :meth:`adopt_file`'s live mark (a fetch or publish ended, its extents indexed);
        a name no extent refers to is unlinked now (the store's name only). Blocking (an index
        read and an unlink per name), fast."""
        done: list[str] = []
        with self._unindexed_lock:
            for name in names:
                left = self._live_files.get(name, 0) - 1
                if left > 0:
                    self._live_files[name] = left
                else:
                    self._live_files.pop(name, None)
                    done.append(name)
        if done:
            referenced = self.db.read(partial(self._referenced_files, done))
            self._unlink_files(n for n in done if n not in referenced)

    @staticmethod
    def _referenced_files(names: Sequence[str], conn: sqlite3.Connection) -> set[str]:
        query = "SELECT 1 FROM content_extents WHERE file = ? LIMIT 1"
        return {n for n in names if conn.execute(query, (n,)).fetchone() is not None}

    def _release(self, digests: Iterable[bytes]) -> None:
        with self._unindexed_lock:
            for digest in digests:
                left = self._unindexed.get(digest, 0) - 1
                if left > 0:
                    self._unindexed[digest] = left
                else:
                    self._unindexed.pop(digest, None)

    async def _store_verified(self, digest: bytes, data: bytes | memoryview) -> None:
        async with self._lock:
            if self.has(digest):
                return
            await run_blocking(lambda: self.write_block_file(digest, data))
            await self.index_blocks([(digest, len(data))])

    async def index_blocks(self, blocks: Sequence[tuple[bytes, int]]) -> None:
        """Index blocks whose files were written by :func:`write_file_atomically` at
        :meth:`block_path` after their bytes were verified (bulk writers such as publishing
        write files on a worker thread, then index them in one transaction). Callers other
        than :meth:`put` must hold :meth:`writing`."""
        now = time.time()
        rows = [(digest, length, now) for digest, length in blocks]

        def insert(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO content_blocks (digest, length, added_at) VALUES (?, ?, ?)", rows)
            conn.executemany("DELETE FROM content_dropped WHERE digest = ?", ((d,) for d, _ in blocks))

        await self.db.write(insert)

    def writing(self) -> trio.Lock:
        """The lock that keeps :meth:`gc` out while blocks are written (hold it with
        ``async with``)."""
        return self._lock

    # -- roots -----------------------------------------------------------------------------------

    async def add_root(self, encoded: bytes, manifest: Manifest, *, pinned: bool = True) -> Cid:
        """Store a manifest (its canonical ``encoded`` bytes) as a root referencing its chunks;
        returns its id. The chunks need not all be stored yet (a fetch adds the root first).
        Adding a root again can pin it but never unpins it (only :meth:`set_pinned` does).
        Raises like :meth:`put`."""
        if len(encoded) > self.max_manifest_bytes:
            raise ContentTooLargeError(f"manifest of {len(encoded)} bytes exceeds the cap of {self.max_manifest_bytes}")
        cid = Cid.for_manifest(encoded)
        unique = manifest.unique_chunks()
        digests = [cid.digest, *unique]
        now = time.time()

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO content_roots (cid, name, total_bytes, chunk_bytes, pinned, added_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (cid) DO UPDATE SET pinned = MAX(pinned, excluded.pinned)",
                (str(cid), manifest.name, manifest.total_bytes, sum(unique.values()), int(pinned), now),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO content_refs (root, digest) VALUES (?, ?)", ((str(cid), d) for d in digests)
            )

        async with self._lock:
            if not self.has(cid.digest):
                await run_blocking(lambda: self.write_block_file(cid.digest, encoded))
                await self.index_blocks([(cid.digest, len(encoded))])
            await self.db.write(insert)
        return cid

    def manifest(self, cid: Cid, **limits: int) -> Manifest:
        """The stored manifest ``cid``, decoded and checked (``limits`` are
        :func:`~lattica.content.manifest.decode_manifest`'s caps). Raises
        :class:`ChunkNotFoundError` or a :class:`~lattica.content.errors.MalformedContentError`
        if the stored bytes were damaged."""
        if not cid.is_manifest:
            raise ChunkNotFoundError(f"{cid} names a chunk, not a manifest")
        return decode_manifest(self.read_block(cid.digest), expected=cid, **limits)

    def roots(self) -> list[RootInfo]:
        """Every manifest held, oldest first, with how much of it is stored here."""
        # held: stored chunks the root references, less its own manifest block.
        query = (
            "SELECT r.cid, r.name, r.total_bytes, r.chunk_bytes, r.pinned, COALESCE(SUM(b.length), 0),"
            " (SELECT reason FROM content_failed x WHERE x.cid = r.cid)"
            " FROM content_roots r"
            " LEFT JOIN content_refs f ON f.root = r.cid"
            " LEFT JOIN content_blocks b ON b.digest = f.digest"
            " GROUP BY r.cid ORDER BY r.added_at, r.cid"
        )
        rows = self.db.read(lambda c: c.execute(query).fetchall())
        result = []
        for text, name, total, chunk_bytes, pinned, referenced, failed in rows:
            cid = Cid.parse(text)
            manifest_bytes = self.block_length(cid.digest) if self.has(cid.digest) else 0
            result.append(RootInfo(cid, name, total, chunk_bytes, referenced - manifest_bytes, bool(pinned), failed))
        return result

    def is_pinned(self, cid: Cid) -> bool:
        """Whether root ``cid`` is held here and pinned."""
        query = "SELECT pinned FROM content_roots WHERE cid = ?"
        row = self.db.read(lambda c: c.execute(query, (str(cid),)).fetchone())
        return bool(row and row[0])

    async def mark_failed(self, cid: Cid, reason: str) -> None:
        """Record that root ``cid`` is bad (``reason``: e.g. a file's SHA-256 differs from
        its manifest's) and unpin it, so :meth:`gc` can free it and :meth:`roots` shows it.
        The mark goes when the root is collected."""

        def update(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE content_roots SET pinned = 0 WHERE cid = ?", (str(cid),))
            conn.execute(
                "INSERT INTO content_failed (cid, reason) VALUES (?, ?)"
                " ON CONFLICT (cid) DO UPDATE SET reason = excluded.reason",
                (str(cid), reason),
            )

        await self.db.write(update)

    def file_sha256_mismatches(self, files: Iterable[FileEntry]) -> list[str]:
        """Paths of ``files`` (a manifest's entries) held whole here whose bytes do not hash to
        the manifest's SHA-256 (a manifest can list the chunks of other bytes than the file it
        claims; its chunk ids alone cannot tell). Files missing a chunk are skipped. Blocking:
        reads every byte of the held files."""
        bad = []
        for entry in files:
            if self.missing(c.digest for c in entry.chunks):
                continue
            whole = hashlib.sha256()
            for piece in self.iter_file(entry.chunks):
                whole.update(piece)
            if whole.digest() != entry.sha256:
                bad.append(entry.path)
        return bad

    def protect(self, digests: Iterable[bytes]) -> None:
        """Keep ``gc`` from collecting these blocks although no root references them yet (a
        publish indexes a file's chunks before the manifest that names them exists); undo with
        :meth:`unprotect`. Call from the trio thread."""
        for digest in digests:
            self._protected[digest] = self._protected.get(digest, 0) + 1

    def unprotect(self, digests: Iterable[bytes]) -> None:
        """Undo one :meth:`protect` of these blocks."""
        for digest in digests:
            left = self._protected.get(digest, 0) - 1
            if left > 0:
                self._protected[digest] = left
            else:
                self._protected.pop(digest, None)

    def fetch_started(self, cid: Cid) -> None:
        """Count a fetch of ``cid`` as running (before it pins the root); with the first one,
        remember whether the root was pinned before any fetch pinned it."""
        count, pinned_before = self._fetching.get(cid, (0, self.is_pinned(cid)))
        self._fetching[cid] = (count + 1, pinned_before)

    def fetch_ended(self, cid: Cid) -> bool:
        """Count a fetch of ``cid`` as ended; True when it was the last one running and the root
        was not pinned before the fetches began (a failed fetch then drops the pin it added;
        one that fails while another fetch of the same root runs must not)."""
        count, pinned_before = self._fetching.pop(cid, (1, True))
        if count > 1:
            self._fetching[cid] = (count - 1, pinned_before)
            return False
        return not pinned_before

    async def set_pinned(self, cid: Cid, pinned: bool) -> None:
        """Pin (keep through :meth:`gc`) or unpin a root; raises :class:`ChunkNotFoundError`
        for a root this store does not hold."""

        def update(conn: sqlite3.Connection) -> int:
            return conn.execute("UPDATE content_roots SET pinned = ? WHERE cid = ?", (int(pinned), str(cid))).rowcount

        if await self.db.write(update) == 0:
            raise ChunkNotFoundError(f"{cid} is not held here")

    # -- maintenance -----------------------------------------------------------------------------

    def _hash_location(self, digest: bytes, where: _Location) -> bool | None:
        """Whether the block's bytes at ``where`` hash to ``digest`` (``None``: the file is
        missing or shorter than the block), one piece in memory at a time."""
        hasher = blake3.blake3()
        try:
            fd = _open_for_reading(where.path)
        except _UNREADABLE:
            return None
        try:
            done = 0
            while done < where.length:
                piece = os.pread(fd, min(_READ_PIECE_BYTES, where.length - done), where.start + done)
                if not piece:
                    return None
                hasher.update(piece)
                done += len(piece)
        finally:
            os.close(fd)
        return hasher.digest() == digest

    def _hash_file(self, digest: bytes) -> bool | None:
        """Whether the stored block hashes to ``digest`` (``None``: missing, or not indexed)."""
        try:
            where = self._location(digest)
        except ChunkNotFoundError:
            return None
        return self._hash_location(digest, where)

    async def verify(self, digests: Iterable[bytes] | None = None, *, drop_bad: bool = False) -> VerifyReport:
        """Re-hash stored blocks (all, or those of ``digests``) and report the ones that are
        missing (never stored, or their file is gone) or damaged; ``checked`` counts the
        blocks re-hashed. With ``drop_bad`` they are removed from the index (and
        a damaged file deleted), so they count as absent and a fetch stores them again."""
        if digests is None:
            wanted: list[bytes] = self.db.read(lambda c: [r[0] for r in c.execute("SELECT digest FROM content_blocks")])
        else:
            requested = list(dict.fromkeys(digests))
            absent = set(self.missing(requested))
            wanted = [d for d in requested if d not in absent]
        bad: list[bytes] = []
        # Asked-for blocks that were never stored are missing too (``verify`` of a root).
        missing: list[bytes] = [] if digests is None else [d for d in requested if d in absent]
        for digest in wanted:
            result = await run_blocking(partial(self._hash_file, digest))
            if result is None:
                missing.append(digest)
            elif not result:
                bad.append(digest)
        if drop_bad and (bad or missing):
            async with self._lock:
                extents = await self._unindex([*bad, *missing], dropped=True)
                # A damaged block file goes; an extent's file is also a user's file: only its
                # index row goes (gc unlinks the store's name once nothing refers to it).
                await run_blocking(partial(self._delete_files, [d for d in bad if d not in extents]))
        return VerifyReport(len(wanted), tuple(bad), tuple(missing), drop_bad)

    async def _unindex(self, digests: Sequence[bytes], *, dropped: bool = False) -> set[bytes]:
        """Drop blocks from the index (``dropped``: remembered as held once and lost, see
        :meth:`dropped`); returns those of them that were extents."""

        def delete(conn: sqlite3.Connection) -> set[bytes]:
            extents = set()
            for digest in digests:
                if conn.execute("DELETE FROM content_blocks WHERE digest = ?", (digest,)).rowcount and dropped:
                    conn.execute("INSERT OR IGNORE INTO content_dropped (digest) VALUES (?)", (digest,))
                if conn.execute("DELETE FROM content_extents WHERE digest = ?", (digest,)).rowcount:
                    extents.add(digest)
            return extents

        return await self.db.write(delete)

    async def gc(self) -> GcReport:
        """Drop unpinned roots, then delete every block no remaining root references, and
        orphan and temporary files. Pinned content is never touched, nor a root a fetch is
        fetching (even unpinned), nor the blocks of a publish still running."""
        fetching: list[str] = []
        protected: set[bytes] = set()

        def collect(conn: sqlite3.Connection) -> tuple[int, list[tuple[bytes, int]]]:
            keep = f" AND cid NOT IN ({','.join('?' * len(fetching))})" if fetching else ""
            roots = conn.execute(f"DELETE FROM content_roots WHERE pinned = 0{keep} RETURNING cid", fetching).fetchall()
            conn.executemany("DELETE FROM content_refs WHERE root = ?", roots)
            conn.executemany("DELETE FROM content_failed WHERE cid = ?", roots)
            unreferenced = conn.execute(
                "SELECT digest, length FROM content_blocks"
                " WHERE NOT EXISTS (SELECT 1 FROM content_refs WHERE content_refs.digest = content_blocks.digest)"
            ).fetchall()
            garbage = [(digest, length) for digest, length in unreferenced if digest not in protected]
            conn.executemany("DELETE FROM content_blocks WHERE digest = ?", ((d,) for d, _ in garbage))
            conn.executemany("DELETE FROM content_extents WHERE digest = ?", ((d,) for d, _ in garbage))
            conn.execute(
                "DELETE FROM content_dropped"
                " WHERE NOT EXISTS (SELECT 1 FROM content_refs WHERE content_refs.digest = content_dropped.digest)"
            )
            return len(roots), garbage

        async with self._lock:
            # Taken under the lock: a publish protects a file's chunks before releasing it.
            fetching += [str(cid) for cid in self._fetching]
            protected.update(self._protected)
            roots_removed, garbage = await self.db.write(collect)
            await run_blocking(lambda: self._delete_files(d for d, _ in garbage))
            orphans = await run_blocking(self._remove_orphans)
            await run_blocking(self._compact_files)
        return GcReport(roots_removed, len(garbage), sum(length for _, length in garbage), orphans)

    def _compact_files(self) -> None:
        """Copy the chunks still used out of a file in ``files/`` whose other names are gone
        (the user deleted the fetched or published file) when at most half of it is used,
        then unlink it (review finding: a 100 MB file stayed for one 1 MiB chunk another root
        shares). Blocking; called under the lock."""
        usage_query = (
            "SELECT e.file, SUM(b.length) FROM content_extents e JOIN content_blocks b ON b.digest = e.digest"
            " GROUP BY e.file"
        )
        usage = self.db.read(lambda c: c.execute(usage_query).fetchall())
        with self._unindexed_lock:
            live = set(self._live_files)
        for name, used in usage:
            path = self.files_dir / name
            try:
                info = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if name in live or info.st_nlink > 1 or 2 * used > info.st_size:
                continue
            self._move_extents_out(name, path)

    def _move_extents_out(self, name: str, path: Path) -> None:
        rows_query = (
            "SELECT e.digest, e.offset, b.length FROM content_extents e"
            " JOIN content_blocks b ON b.digest = e.digest WHERE e.file = ?"
        )
        rows = self.db.read(lambda c: c.execute(rows_query, (name,)).fetchall())
        moved: list[bytes] = []
        lost: list[bytes] = []
        for digest, start, length in rows:
            try:
                data = self._pread(digest, _Location(length, path, start, True), 0, length)
            except ChunkNotFoundError:
                lost.append(digest)
                continue
            if blake3_digest(data) != digest:
                lost.append(digest)
                continue
            self.write_block_file(digest, data, durable=False)
            moved.append(digest)
        self.sync_to_disk()  # the block files, before the index stops pointing at the file

        def update(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM content_extents WHERE digest = ? AND file = ?", ((d, name) for d in moved))
            for digest in lost:
                conn.execute("DELETE FROM content_extents WHERE digest = ? AND file = ?", (digest, name))
                conn.execute("DELETE FROM content_blocks WHERE digest = ?", (digest,))
                conn.execute("INSERT OR IGNORE INTO content_dropped (digest) VALUES (?)", (digest,))

        self.db.write_blocking(update)
        self._unlink_files([name])

    def _delete_files(self, digests: Iterable[bytes]) -> None:
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                self.block_path(digest).unlink()

    def _remove_orphans(self) -> int:
        """Delete temporary files, block files without an index row (or whose block is held as
        an extent now), and files in ``files/`` no extent refers to (the store's name only: a
        fetched file's own name stays). Called under the lock."""

        def indexed_query(conn: sqlite3.Connection) -> tuple[set[bytes], set[str]]:
            blocks = {
                r[0]
                for r in conn.execute(
                    "SELECT digest FROM content_blocks b"
                    " WHERE NOT EXISTS (SELECT 1 FROM content_extents e WHERE e.digest = b.digest)"
                )
            }
            return blocks, {r[0] for r in conn.execute("SELECT DISTINCT file FROM content_extents")}

        indexed, files = self.db.read(indexed_query)
        with self._unindexed_lock:
            indexed |= self._unindexed.keys()  # being written by a fetch: not orphans
            files |= self._live_files.keys()
            # A fetch writing now has live temporary files: leave tmp/ to a later gc.
            skip_tmp = self._unlocked_writers > 0
        removed = 0
        for entry in self.root.iterdir():
            if entry.name == TMP_DIR and skip_tmp:
                continue
            if entry.name == FILES_DIR:
                for file in entry.iterdir():
                    if file.name not in files:
                        with contextlib.suppress(FileNotFoundError):
                            file.unlink()
                        removed += 1
            elif entry.name == TMP_DIR or (entry.is_dir() and len(entry.name) == 2):
                for file in entry.iterdir():
                    try:
                        keep = entry.name != TMP_DIR and bytes.fromhex(file.name) in indexed
                    except ValueError:
                        keep = False
                    if not keep:
                        with contextlib.suppress(FileNotFoundError):
                            file.unlink()
                        removed += 1
        return removed
