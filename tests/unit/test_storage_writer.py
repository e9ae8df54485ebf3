"""The sqlite writer: group commit off the trio thread, acknowledged after commit, typed faults."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from lattica.storage import CorruptDatabaseError, DiskFullError, SqliteWriter, StorageError, transaction
from tests.conftest import MakeTmpfs

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)"


def open_writer(path: Path | str, **kwargs: object) -> SqliteWriter:
    writer = SqliteWriter(path, **kwargs)  # type: ignore[arg-type]
    writer.write_blocking(lambda c: c.execute(SCHEMA))
    return writer


def insert(k: int, v: bytes = b"x") -> Callable[[sqlite3.Connection], int]:
    def fn(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, v))
        return k

    return fn


def committed_keys(path: Path) -> set[int]:
    """What another process would see: a fresh connection, outside the writer."""
    conn = sqlite3.connect(path)
    try:
        return {k for (k,) in conn.execute("SELECT k FROM t")}
    finally:
        conn.close()


class Gate:
    """A write function that holds the writer thread until released (to let a burst queue up)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: sqlite3.Connection) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return "gate"


async def run_burst(
    writer: SqliteWriter, fns: list[Callable[[sqlite3.Connection], object]]
) -> list[object | BaseException]:
    """Hold the writer, queue ``fns`` concurrently, release: they share one transaction."""
    results: list[object | BaseException] = [None] * len(fns)
    gate = Gate()

    async def one(i: int) -> None:
        try:
            results[i] = await writer.write(fns[i])
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, gate)
        await trio.to_thread.run_sync(gate.entered.wait)
        for i in range(len(fns)):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        gate.release.set()
    return results


async def test_a_burst_of_writes_costs_one_commit_and_each_is_acknowledged_after_it(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    writer = open_writer(db)
    before = writer.commit_count
    acknowledged: list[int] = []

    async def write_and_check(k: int) -> None:
        await writer.write(insert(k))
        # Acknowledged means committed: a separate connection already sees it.
        assert k in committed_keys(db)
        acknowledged.append(k)

    gate = Gate()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, gate)
        await trio.to_thread.run_sync(gate.entered.wait)
        for k in range(100):
            nursery.start_soon(write_and_check, k)
        await trio.testing.wait_all_tasks_blocked()
        assert committed_keys(db) == set()  # queued, not yet acknowledged
        gate.release.set()
    assert sorted(acknowledged) == list(range(100))
    assert writer.commit_count - before == 2  # the gate's transaction, then all 100 together
    writer.close()


async def test_the_event_loop_runs_while_a_write_commits(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "w.db")
    gate = Gate()
    send, receive = trio.open_memory_channel[int](0)

    async def echo() -> None:
        async for value in receive:
            await send.send(value + 1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, gate)
        await trio.to_thread.run_sync(gate.entered.wait)
        # The write is in progress on the writer thread; other tasks still run.
        nursery.start_soon(echo)
        await send.send(1)
        assert await receive.receive() == 2
        gate.release.set()
        nursery.cancel_scope.cancel()
    writer.close()


async def test_a_failing_write_is_rolled_back_alone(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    writer = open_writer(db)

    def insert_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (k, v) VALUES (2, x'00')")
        raise ValueError("refused")

    await writer.write(insert(10))
    results = await run_burst(writer, [insert(1), insert_then_fail, insert(10), insert(3)])
    assert results[0] == 1 and results[3] == 3
    assert isinstance(results[1], ValueError)
    # A constraint violation is an sqlite error: a StorageError for that write only.
    assert isinstance(results[2], StorageError) and "UNIQUE" in str(results[2])
    assert committed_keys(db) == {1, 3, 10}
    writer.close()


async def test_disk_full_fails_that_write_keeps_earlier_ones_and_reads_go_on(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    writer = open_writer(db)
    await writer.write(insert(0))
    (pages,) = writer.read(lambda c: c.execute("PRAGMA page_count").fetchone())
    # sqlite reports a page budget running out exactly as it reports ENOSPC: SQLITE_FULL.
    writer.write_blocking(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 8}"))
    stored = [0]
    with pytest.raises(DiskFullError) as caught:
        for k in range(1, 100):
            await writer.write(insert(k, b"x" * 8192))
            stored.append(k)
    message = str(caught.value)
    assert str(db) in message and "database or disk is full" in message
    assert "cannot rollback" not in message
    assert committed_keys(db) == set(stored)
    assert writer.read(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()) == (len(stored),)
    await writer.write(lambda c: c.execute("DELETE FROM t WHERE k = 1"))  # writes work again once space frees
    writer.close()


@pytest.fixture
def tiny_filesystem(make_tmpfs: MakeTmpfs) -> Path:
    """A 1 MiB tmpfs (needs root; CI runs as root)."""
    return make_tmpfs(1)


async def test_a_real_full_disk_is_named_as_such(tiny_filesystem: Path) -> None:
    db = tiny_filesystem / "w.db"
    writer = open_writer(db)
    await writer.write(insert(0))
    stored = [0]
    with pytest.raises(DiskFullError) as caught:
        for k in range(1, 1000):
            await writer.write(insert(k, os.urandom(16384)))
            stored.append(k)
    assert "database or disk is full" in str(caught.value) and str(db) in str(caught.value)
    assert len(stored) > 1
    assert writer.read(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()) == (len(stored),)
    writer.close()
    assert committed_keys(db) == set(stored)


def test_a_file_of_random_bytes_is_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "lattica.db"
    db.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CorruptDatabaseError) as caught:
        SqliteWriter(db)
    assert str(caught.value) == (
        f"{db} is not a Lattica database (file is not a database); move it aside to start with an empty store"
    )


def test_a_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="unable to open database file"):
        SqliteWriter(tmp_path / "missing" / "lattica.db")


async def test_in_memory_readers_see_the_writers_database() -> None:
    writer = open_writer(":memory:")
    await writer.write(insert(7))
    assert writer.read(lambda c: c.execute("SELECT k FROM t").fetchall()) == [(7,)]
    writer.close()


async def test_file_readers_cannot_write(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "w.db")
    with pytest.raises(StorageError, match="readonly"):
        writer.read(lambda c: c.execute("INSERT INTO t (k, v) VALUES (1, x'00')"))
    writer.close()


async def test_virtual_time_stands_still_while_a_write_runs(autojump_clock: trio.testing.MockClock) -> None:
    writer = open_writer(":memory:")

    def slow_insert(conn: sqlite3.Connection) -> None:
        # Not a wait for a condition: this is the write itself taking real time on the writer
        # thread, which autojump would turn into a jump to the 10 s deadline if trio sat idle.
        time.sleep(0.05)
        conn.execute("INSERT INTO t (k, v) VALUES (1, x'00')")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 10)  # a deadline autojump would jump to
        start = trio.current_time()
        await writer.write(slow_insert)
        assert trio.current_time() == start
        nursery.cancel_scope.cancel()
    writer.close()


async def test_a_closed_writer_refuses_reads_and_writes(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "w.db")
    writer.close()
    writer.close()
    with pytest.raises(trio.ClosedResourceError):
        await writer.write(insert(1))
    with pytest.raises(trio.ClosedResourceError):
        writer.read(lambda c: c.execute("SELECT 1").fetchone())


async def test_inline_mode_commits_each_write_on_the_calling_thread(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    writer = open_writer(db, inline=True)
    threads: list[int] = []

    def record_thread(conn: sqlite3.Connection) -> None:
        threads.append(threading.get_ident())
        conn.execute("INSERT INTO t (k, v) VALUES (?, x'00')", (len(threads),))

    before = writer.commit_count
    for _ in range(3):
        await writer.write(record_thread)
    assert threads == [threading.get_ident()] * 3
    assert writer.commit_count - before == 3
    assert committed_keys(db) == {1, 2, 3}
    writer.close()


def test_transaction_reports_the_real_error_when_sqlite_already_rolled_back() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(SCHEMA)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction(conn):
        conn.execute("INSERT INTO t (k, v) VALUES (1, x'00')")
        conn.execute("ROLLBACK")  # as sqlite does by itself after SQLITE_FULL or an I/O error
        raise Boom
    assert not conn.in_transaction
    with transaction(conn):
        conn.execute("INSERT INTO t (k, v) VALUES (2, x'00')")
    assert conn.execute("SELECT k FROM t").fetchall() == [(2,)]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_after_a_full_disk_rollback_hooks_resync_in_memory_state(tiny_filesystem: Path) -> None:
    writer = open_writer(tiny_filesystem / "w.db")
    rows = {"counted": 0}

    def insert_and_count(k: int) -> Callable[[sqlite3.Connection], None]:
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, os.urandom(16384)))
            rows["counted"] += 1  # in-memory state kept on the writer thread, as DhtStore does

        return fn

    def recount(conn: sqlite3.Connection) -> None:
        (rows["counted"],) = conn.execute("SELECT COUNT(*) FROM t").fetchone()

    writer.on_rollback(recount)
    with pytest.raises(DiskFullError):
        for k in range(1000):
            await writer.write(insert_and_count(k))
    assert writer.read(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()) == (rows["counted"],)
    writer.close()
