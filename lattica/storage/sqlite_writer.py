"""One writer per sqlite database: group commit on a worker thread, reads on the caller's thread.

Why: with ``synchronous=FULL`` a commit waits for fsync (~0.6 ms on this machine's disk, far more
on a busy one). Committed on the trio thread inside request handling, every peer's write stalled
every timer in the process. Here a write is a function queued to a worker thread; the caller's
task waits, the event loop does not.

Rules (invariants):

* One connection writes: the writer's. At most one worker thread uses it at a time (a *drain*
  runs while writes are pending; trio's thread cache supplies the thread). Each turn of the
  drain takes everything queued (up to ``max_batch``) into one transaction: group commit, so a
  burst of N writes costs about one fsync.
* Each write runs under its own SAVEPOINT: a write function that raises is rolled back alone
  and its caller gets that exception (an sqlite error as a :class:`StorageError`); the other
  writes of the batch still commit.
* ``await write(fn)`` returns only after the COMMIT holding ``fn``'s changes returned; in WAL
  mode with ``synchronous=FULL`` that means on disk. If the transaction itself fails (disk
  full, I/O error), every write of that batch gets the :class:`StorageError`; nothing of the
  batch was acknowledged, every earlier batch stays committed.
* Cancelling a task waiting in :meth:`SqliteWriter.write` does not withdraw its write; it may
  still commit.
* Reads (:meth:`SqliteWriter.read`) run synchronously on the caller's thread. For a database
  file they use a second connection (``query_only``): in WAL mode a reader sees the last
  committed transaction and never waits for the writer or its fsync. ``:memory:`` is one
  database per connection, so there readers share the writer's connection under a lock, held
  for one in-memory transaction at most (no I/O: microseconds).
* Virtual time: under ``trio.testing.MockClock`` a caller waits for its write by blocking the
  trio thread (the write still runs on the worker thread and the same connection). An awaited
  wait would let autojump move virtual time to the next deadline while the thread works --
  timing out requests that took no virtual time -- and the point at which the result came back
  would depend on real thread speed, so one seed would no longer give one run.
* ``inline=True`` commits each write on the caller's thread in its own transaction: the old
  behaviour, kept only as the benchmark's baseline.

Reusable beyond the DHT: the CRDT update log and the block index can share one writer (and so
one group commit) for ``lattica.db``; :meth:`SqliteWriter.on_rollback` lets each keep in-memory
totals in step with what actually committed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Generic, TypeVar

import outcome
import trio
import trio.testing

from lattica.storage.errors import StorageError, describe_path, storage_error

log = logging.getLogger("lattica.storage")

T = TypeVar("T")

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_MAX_BATCH = 512
DEFAULT_MAX_QUEUED = 10_000


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back if the body or the commit raises.

    ``conn`` must be in autocommit mode (``isolation_level=None``). After some errors
    (``SQLITE_FULL``, I/O errors) sqlite has already rolled the transaction back; a second
    ``ROLLBACK`` would then fail with "cannot rollback - no transaction is active" and hide the
    real cause, so it is only issued while a transaction is open. The body's (or the commit's)
    exception is re-raised unchanged.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_error:  # the original error is the one to report
                log.warning("rollback failed after an error: %s", rollback_error)
        raise


class _Write(Generic[T]):
    """One queued write and, once done, its outcome."""

    __slots__ = ("_notify", "done", "fn", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], T], notify: Callable[[], None] | None) -> None:
        self.fn = fn
        self.result: outcome.Outcome[T] | None = None
        self.done = threading.Event()
        self._notify = notify

    def finish(self) -> None:
        self.done.set()
        if self._notify is not None:
            self._notify()

    def unwrap(self) -> T:
        assert self.result is not None
        return self.result.unwrap()


def _clock_is_virtual() -> bool:
    return isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


def _wake_soon(token: trio.lowlevel.TrioToken, event: trio.Event) -> Callable[[], None]:
    def notify() -> None:
        # If the run that waited is over, nobody is left to wake.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(event.set)

    return notify


class SqliteWriter:
    """The one writer of an sqlite database, plus its readers (see the module docstring).

    ``path`` is a file or ``":memory:"``. ``synchronous`` is sqlite's ``PRAGMA synchronous``
    (``FULL``: a commit is on disk when it returns). ``max_batch`` bounds the writes in one
    transaction, ``max_queued`` the writes waiting (beyond it :meth:`write` raises
    :class:`StorageError` at once rather than queue without bound). ``inline=True``: commit each
    write on the caller's thread (benchmark baseline only).

    Raises :class:`~lattica.storage.errors.StorageError` (a
    :class:`~lattica.storage.errors.CorruptDatabaseError` for a file that is not an sqlite
    database) when the database cannot be opened.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        inline: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}")
        if max_batch < 1 or max_queued < 1:
            raise ValueError("max_batch and max_queued must be at least 1")
        self.path = str(path)
        self.inline = inline
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.commit_count = 0
        """Transactions committed by writes (a batch is one)."""
        self.write_count = 0
        """Writes acknowledged as committed."""
        self._rollback_hooks: list[Callable[[sqlite3.Connection], None]] = []
        self._pending: collections.deque[_Write[Any]] = collections.deque()
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._draining = False
        self._closed = False
        memory = self.path == ":memory:"
        self._conn = self._open(synchronous.upper())
        try:
            if memory or inline:
                self._reader = self._conn
            else:
                self._reader = self._open(synchronous.upper())
                self._reader.execute("PRAGMA query_only=ON")
        except BaseException:
            self._conn.close()
            raise
        # The writer's connection is shared with readers only for ``:memory:`` (and inline).
        self._shared_lock: threading.Lock | None = threading.Lock() if self._reader is self._conn else None
        self._read_lock = self._shared_lock or threading.Lock()

    def _open(self, synchronous: str) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise storage_error(self.path, exc) from exc
        try:
            # The first statement reads the file header: a file that is not a database fails here.
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute(f"PRAGMA synchronous={synchronous}")
        except sqlite3.Error as exc:
            conn.close()
            raise storage_error(self.path, exc) from exc
        return conn

    def on_rollback(self, hook: Callable[[sqlite3.Connection], None]) -> None:
        """Call ``hook(connection)`` on the writer thread after a write or batch rolled back
        because of an sqlite error, so in-memory state derived from the tables can be
        recomputed from what is actually committed."""
        self._rollback_hooks.append(hook)

    # -- reads -----------------------------------------------------------------------------------

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the caller's thread, seeing the last committed state.

        Raises :class:`StorageError` (naming the file) for an sqlite error and
        ``trio.ClosedResourceError`` once closed.
        """
        with self._read_lock:
            if self._closed:
                raise trio.ClosedResourceError(f"{describe_path(self.path)} is closed")
            try:
                return fn(self._reader)
            except sqlite3.Error as exc:
                raise storage_error(self.path, exc) from exc

    # -- writes ----------------------------------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the next transaction; return its result once committed.

        ``fn`` runs on the writer thread and must only use the connection it is given (no trio,
        no other shared state unless guarded). Raises what ``fn`` raised (its changes rolled
        back), :class:`StorageError` when the transaction failed (nothing of it stored),
        ``trio.ClosedResourceError`` once closed.
        """
        await trio.lowlevel.checkpoint()
        if self.inline:
            return self._write_inline(fn)
        if _clock_is_virtual():
            return self.write_blocking(fn)
        done = trio.Event()
        item = _Write(fn, _wake_soon(trio.lowlevel.current_trio_token(), done))
        self._submit(item)
        await done.wait()
        return item.unwrap()

    def write_blocking(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """:meth:`write`, waiting by blocking the calling thread (start-up schema, shutdown,
        virtual time). Never call it from inside a write function."""
        if self.inline:
            return self._write_inline(fn)
        item = _Write(fn, None)
        self._submit(item)
        item.done.wait()
        return item.unwrap()

    def _write_inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        item = _Write(fn, None)
        with self._mutex:
            if self._closed:
                raise trio.ClosedResourceError(f"{describe_path(self.path)} is closed")
        self._commit([item])
        return item.unwrap()

    def _submit(self, item: _Write[Any]) -> None:
        with self._mutex:
            if self._closed:
                raise trio.ClosedResourceError(f"{describe_path(self.path)} is closed")
            if len(self._pending) >= self.max_queued:
                where = describe_path(self.path)
                raise StorageError(
                    f"{where}: {len(self._pending)} writes already waiting; try again later",
                    path=self.path,
                    cause="write queue full",
                )
            self._pending.append(item)
            if self._draining:
                return
            self._draining = True
        try:
            trio.lowlevel.start_thread_soon(self._drain, self._drain_ended, name=f"sqlite writer {self.path}")
        except BaseException:
            with self._mutex:
                self._pending.remove(item)
                self._draining = False
                self._idle.notify_all()
            raise

    def _drain(self) -> None:
        while True:
            with self._mutex:
                if not self._pending:
                    self._draining = False
                    self._idle.notify_all()
                    return
                count = min(len(self._pending), self.max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
            try:
                self._commit(batch)
            finally:
                for item in batch:
                    if item.result is None:  # only if _commit itself broke (a bug): never hang a caller
                        item.result = outcome.Error(RuntimeError("the database writer failed"))
                    item.finish()

    @staticmethod
    def _drain_ended(result: outcome.Outcome[None]) -> None:
        if isinstance(result, outcome.Error):
            log.error("sqlite writer thread failed", exc_info=result.error)

    def _commit(self, batch: list[_Write[Any]]) -> None:
        """One transaction for ``batch``; sets every item's result (never raises sqlite errors)."""
        conn = self._conn
        with self._shared_lock or nullcontext():
            try:
                with transaction(conn):
                    for item in batch:
                        self._run_one(conn, item)
            except sqlite3.Error as exc:
                error = storage_error(self.path, exc)
                log.warning("%s", error)
                for item in batch:
                    if item.result is None or isinstance(item.result, outcome.Value):
                        item.result = outcome.Error(error)
                self._run_rollback_hooks(conn)
                return
            self.commit_count += 1
            self.write_count += sum(1 for item in batch if isinstance(item.result, outcome.Value))

    def _run_one(self, conn: sqlite3.Connection, item: _Write[Any]) -> None:
        conn.execute("SAVEPOINT lattica_write")
        try:
            value = item.fn(conn)
        except sqlite3.Error as exc:
            if not conn.in_transaction:
                raise  # sqlite rolled the whole transaction back: the batch is lost, not just this write
            item.result = outcome.Error(storage_error(self.path, exc))
            conn.execute("ROLLBACK TO lattica_write")
            conn.execute("RELEASE lattica_write")
            self._run_rollback_hooks(conn)
        except Exception as exc:
            item.result = outcome.Error(exc)
            conn.execute("ROLLBACK TO lattica_write")
            conn.execute("RELEASE lattica_write")
        else:
            item.result = outcome.Value(value)
            conn.execute("RELEASE lattica_write")

    def _run_rollback_hooks(self, conn: sqlite3.Connection) -> None:
        for hook in self._rollback_hooks:
            try:
                hook(conn)
            except sqlite3.Error as exc:
                log.warning("%s", storage_error(self.path, exc))

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for queued writes to finish, then close the connections (idempotent).

        Blocks the calling thread while a batch is being committed.
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            while self._draining:
                self._idle.wait()
        with self._read_lock:
            if self._reader is not self._conn:
                self._reader.close()
            self._conn.close()
