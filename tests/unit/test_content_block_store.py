"""Block store: verified, atomic, indexed chunks; ranged reads; verify, pin, gc; disk full."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from lattica.content import ChunkMismatchError, ChunkNotFoundError, ContentTooLargeError, blake3_digest
from lattica.content.block_store import BlockStore
from lattica.content.publish import publish
from lattica.storage import DiskFullError, SqliteWriter
from tests.conftest import MakeTmpfs
from tests.unit.content_samples import KIB, MIB, open_store, random_bytes


async def test_put_then_read_ranges(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        data = random_bytes(100 * KIB, 1)
        digest = await store.put(data)
        assert digest == blake3_digest(data)
        assert store.has(digest)
        assert store.block_path(digest).read_bytes() == data
        assert await store.read(digest) == data
        assert await store.read(digest, 1000, 24) == data[1000:1024]
        assert store.read_block(digest, len(data) - 1) == data[-1:]
        with pytest.raises(ValueError):
            store.read_block(digest, 10, len(data))
        with store.open_block(digest) as file:
            file.seek(50 * KIB)
            assert file.read(10) == data[50 * KIB : 50 * KIB + 10]


async def test_bytes_that_do_not_match_their_digest_are_not_stored(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        claimed = blake3_digest(b"the real chunk")
        with pytest.raises(ChunkMismatchError):
            await store.put(b"something else", claimed)
        assert not store.has(claimed)
        assert not store.block_path(claimed).exists()
        assert not store.has(blake3_digest(b"something else"))
        assert list(store.tmp_dir.iterdir()) == []
        assert await store.put(b"the real chunk", claimed) == claimed


async def test_oversized_chunk_is_refused(tmp_path: Path) -> None:
    writer = SqliteWriter(tmp_path / "db")
    try:
        store = BlockStore(tmp_path / "blocks", writer, max_chunk_bytes=1024)
        with pytest.raises(ContentTooLargeError):
            await store.put(b"x" * 1025)
    finally:
        writer.close()


async def test_disk_work_takes_no_virtual_time(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # Under a virtual clock the hashing and file writes run inline: a worker thread would let
    # autojump move time while it ran, and one seed would no longer give one run.
    with open_store(tmp_path) as store:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 3600)  # a deadline autojump could move to
            start = trio.current_time()
            digest = await store.put(random_bytes(256 * KIB, 2))
            assert await store.read(digest, 0, 4) == store.block_path(digest).read_bytes()[:4]
            assert (await store.verify()).ok
            await store.gc()
            assert trio.current_time() == start
            nursery.cancel_scope.cancel()


async def test_index_survives_reopening(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        digest = await store.put(b"kept")
    with open_store(tmp_path) as store:
        assert store.has(digest)
        assert store.read_block(digest) == b"kept"
        assert store.missing([digest, blake3_digest(b"other"), digest]) == [blake3_digest(b"other")]


async def test_unknown_block_is_not_found(tmp_path: Path) -> None:
    with open_store(tmp_path) as store, pytest.raises(ChunkNotFoundError):
        store.read_block(blake3_digest(b"never stored"))


async def test_verify_reports_and_drops_bad_and_missing_blocks(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        good = await store.put(b"good" * 1000)
        damaged = await store.put(b"damaged" * 1000)
        lost = await store.put(b"lost" * 1000)
        path = store.block_path(damaged)
        path.write_bytes(b"X" + path.read_bytes()[1:])
        store.block_path(lost).unlink()
        report = await store.verify()
        assert report.checked == 3 and not report.ok
        assert report.bad == (damaged,) and report.missing == (lost,)
        assert store.has(damaged)  # reported, not dropped
        report = await store.verify([damaged, lost, good], drop_bad=True)
        assert report.bad == (damaged,) and report.missing == (lost,) and report.dropped
        assert store.missing([good, damaged, lost]) == [damaged, lost]
        assert not store.block_path(damaged).exists()
        assert (await store.verify()).ok
        never = blake3_digest(b"never stored")
        report = await store.verify([good, never])
        assert report.checked == 1 and report.missing == (never,) and report.bad == ()
        # Fetched again, they are stored again.
        assert await store.put(b"damaged" * 1000, damaged) == damaged


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


async def test_gc_keeps_pinned_content_and_removes_the_rest(tmp_path: Path) -> None:
    shared = random_bytes(64 * KIB, 3)
    a = _folder(tmp_path / "a", {"x.bin": shared, "only-a.bin": random_bytes(5000, 4)})
    b = _folder(tmp_path / "b", {"x.bin": shared, "only-b.bin": random_bytes(7000, 5)})
    with open_store(tmp_path / "store") as store:
        kept = await publish(store, a)
        dropped = await publish(store, b)
        loose = await store.put(b"not part of any root")
        (store.root / "ab").mkdir(exist_ok=True)
        orphan = store.root / "ab" / ("ab" + "00" * 31)
        orphan.write_bytes(b"left by a crash between file and index")
        (store.tmp_dir / "block-x.tmp").write_bytes(b"half-written")
        await store.set_pinned(dropped.cid, False)
        assert [(r.cid, r.pinned) for r in store.roots()] == [(kept.cid, True), (dropped.cid, False)]
        report = await store.gc()
        assert report.roots_removed == 1
        assert report.blocks_removed == 3  # only-b's chunk, b's manifest, the loose block
        # The crash's block file, the temporary file, and the store's link to only-b.bin (its
        # chunk was held as a range of the published file itself; the file stays).
        assert report.orphans_removed == 3
        assert (b / "only-b.bin").exists() and len(list(store.files_dir.iterdir())) == 2
        assert [r.cid for r in store.roots()] == [kept.cid]
        assert not store.has(loose) and not orphan.exists() and list(store.tmp_dir.iterdir()) == []
        needed = [c.digest for f in kept.manifest.files for c in f.chunks]
        assert store.missing(needed) == []
        assert store.manifest(kept.cid) == kept.manifest
        with pytest.raises(ChunkNotFoundError):
            store.manifest(dropped.cid)
        with pytest.raises(ChunkNotFoundError):
            await store.set_pinned(dropped.cid, True)


async def test_disk_full_names_the_path_and_keeps_what_was_stored(tmp_path: Path, make_tmpfs: MakeTmpfs) -> None:
    disk = make_tmpfs(4)
    writer = SqliteWriter(tmp_path / "lattica.db")  # the index on another disk: the blocks fill
    try:
        store = BlockStore(disk / "blocks", writer)
        stored = []
        with pytest.raises(DiskFullError) as caught:
            for number in range(16):
                stored.append(await store.put(bytes([number]) * 512 * KIB))
        assert str(disk / "blocks") in caught.value.path
        assert "disk full" in str(caught.value)
        assert stored, "some blocks fit before the disk was full"
        assert list(store.tmp_dir.iterdir()) == []  # no half-written file left behind
        report = await store.verify()
        assert report.ok and report.checked == len(stored)
        for number, digest in enumerate(stored):
            assert store.read_block(digest) == bytes([number]) * 512 * KIB
    finally:
        writer.close()


async def test_publish_of_a_folder_larger_than_the_disk_fails_cleanly(tmp_path: Path, make_tmpfs: MakeTmpfs) -> None:
    disk = make_tmpfs(2)
    folder = _folder(tmp_path / "model", {"big.bin": random_bytes(3 * MIB, 6)})
    writer = SqliteWriter(tmp_path / "lattica.db")
    try:
        store = BlockStore(disk / "blocks", writer)
        with pytest.raises(DiskFullError):
            await publish(store, folder)
        assert store.roots() == []
        assert (await store.verify()).ok
    finally:
        writer.close()


async def test_adding_a_root_again_never_unpins_it(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "a", {"x.bin": b"x" * 100})
    with open_store(tmp_path / "store") as store:
        pinned = await publish(store, folder)
        again = await publish(store, folder, pinned=False)
        assert again.cid == pinned.cid
        assert [r.pinned for r in store.roots()] == [True]
        await store.set_pinned(pinned.cid, False)
        await publish(store, folder, pinned=True)
        assert [r.pinned for r in store.roots()] == [True]


async def test_put_many_stores_the_good_chunks_and_rejects_the_bad(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    good = [random_bytes(10 * KIB, 70 + n) for n in range(5)]
    forged = (b"forged bytes", blake3_digest(b"the real bytes"))
    with open_store(tmp_path) as store:
        already = await store.put(good[0])
        flushes: list[int] = []
        real_sync = store.sync_to_disk
        monkeypatch.setattr(store, "sync_to_disk", lambda: flushes.append(1) or real_sync())
        batch = [(data, blake3_digest(data)) for data in good] + [forged, (good[1], blake3_digest(good[1]))]
        result = await store.put_many(batch)
        assert result.stored == (already, *[blake3_digest(d) for d in good[1:]], blake3_digest(good[1]))
        assert result.rejected == (forged[1],)
        assert flushes == [1]  # one flush for the four new blocks
        assert store.missing(blake3_digest(d) for d in good) == []
        assert not store.has(forged[1]) and not store.block_path(forged[1]).exists()
        assert (await store.verify()).ok
        with pytest.raises(ContentTooLargeError):
            await store.put_many([(b"x" * (store.max_chunk_bytes + 1), b"\0" * 32)])


async def test_roots_report_how_much_of_them_is_held(tmp_path: Path) -> None:
    chunk = random_bytes(64 * KIB, 8)
    folder = _folder(tmp_path / "a", {"one.bin": chunk, "same.bin": chunk, "other.bin": random_bytes(1000, 9)})
    with open_store(tmp_path / "publisher") as publisher:
        published = await publish(publisher, folder)
        encoded = publisher.read_block(published.cid.digest)
    with open_store(tmp_path / "fetcher") as fetcher:
        # A fetch starts with the manifest alone, then stores chunks as they arrive.
        await fetcher.add_root(encoded, published.manifest)
        (root,) = fetcher.roots()
        assert (root.total_bytes, root.chunk_bytes, root.held_bytes) == (2 * len(chunk) + 1000, len(chunk) + 1000, 0)
        assert not root.complete
        await fetcher.put(chunk)
        assert fetcher.roots()[0].held_bytes == len(chunk) and not fetcher.roots()[0].complete
        await fetcher.put((folder / "other.bin").read_bytes())
        assert fetcher.roots()[0].complete


async def test_blocks_written_but_not_yet_indexed_survive_gc_and_are_stored_once_indexed(tmp_path: Path) -> None:
    chunks = [random_bytes(32 * KIB, 40 + i) for i in range(3)]
    pairs = [(data, blake3_digest(data)) for data in chunks]
    with open_store(tmp_path / "store") as store:
        already = await store.put(chunks[0])
        written = await trio.to_thread.run_sync(store.write_unindexed, pairs)
        assert [digest for digest, _ in written] == [d for _, d in pairs[1:]]  # the stored one is not rewritten
        assert not store.has(pairs[1][1])  # not acknowledged before index_written
        report = await store.gc()  # a fetch's flush is due later: its files are not orphans
        assert report.orphans_removed == 0
        assert report.blocks_removed == 1 and not store.has(already)  # indexed, unreferenced: collected
        assert all(store.block_path(d).exists() for d, _ in written)
        await store.index_written(written)
        assert all(store.read_block(d) == data for data, d in pairs[1:])
        # Once indexed they are released: unreferenced blocks go at the next gc like any other.
        assert (await store.gc()).blocks_removed == 2


async def test_a_failed_unindexed_write_leaves_orphans_for_gc(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pairs = [(random_bytes(8 * KIB, 50 + i), b"") for i in range(3)]
    pairs = [(data, blake3_digest(data)) for data, _ in pairs]
    with open_store(tmp_path / "store") as store:
        real = store.write_block_file
        calls = 0

        def fail_third(digest: bytes, data: bytes, *, durable: bool = True) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise OSError(5, "Input/output error")
            real(digest, data, durable=durable)

        monkeypatch.setattr(store, "write_block_file", fail_third)
        with pytest.raises(OSError, match="Input/output"):
            await trio.to_thread.run_sync(store.write_unindexed, pairs)
        report = await store.gc()
        assert report.orphans_removed == 2  # released: not held back from gc forever


async def test_only_the_last_of_concurrent_fetches_may_drop_the_pin_they_added(tmp_path: Path) -> None:
    # Review finding: a fetch that failed unpinned content another fetch of it was still
    # fetching (and then completed), so the next gc freed it.
    with open_store(tmp_path / "store") as store:
        result = await publish(store, _folder(tmp_path / "a", {"x.bin": random_bytes(5000, 60)}))
        await store.set_pinned(result.cid, False)
        store.fetch_started(result.cid)  # fetch 1 (the root was not pinned before it)
        store.fetch_started(result.cid)  # fetch 2 joins
        assert store.fetch_ended(result.cid) is False  # fetch 1 fails: fetch 2 still runs
        assert store.fetch_ended(result.cid) is True  # the last one may drop the pin
        await store.set_pinned(result.cid, True)
        store.fetch_started(result.cid)  # pinned by the user before: never dropped
        assert store.fetch_ended(result.cid) is False


async def test_read_start_gives_the_length_and_the_first_bytes(tmp_path: Path) -> None:
    data = random_bytes(100 * KIB, 70)
    with open_store(tmp_path / "store") as store:
        digest = await store.put(data)
        assert store.read_start(digest, 1 << 20) == (len(data), data)
        assert store.read_start(digest, 10) == (len(data), data[:10])
        store.block_path(digest).write_bytes(data[:5])
        with pytest.raises(ChunkNotFoundError, match="shorter"):
            store.read_start(digest, 10)
        store.block_path(digest).unlink()
        with pytest.raises(ChunkNotFoundError, match="cannot be read"):
            store.read_start(digest, 10)
        with pytest.raises(ChunkNotFoundError):
            store.read_start(b"\1" * 32, 10)


async def test_gc_between_the_files_of_a_publish_collects_none_of_its_chunks(tmp_path: Path) -> None:
    # Review finding: publish indexes each file's chunks, then adds the root after the last
    # file; a gc in between took the first files' chunks and the publish "succeeded" anyway.
    folder = _folder(tmp_path / "m", {"a.bin": random_bytes(300 * KIB, 80), "b.bin": random_bytes(300 * KIB, 81)})
    with open_store(tmp_path / "store") as store:
        published = trio.Event()
        collected = 0

        async def gc_loop() -> None:
            nonlocal collected
            while not published.is_set():
                collected += (await store.gc()).blocks_removed
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(gc_loop)
            await trio.lowlevel.checkpoint()
            result = await publish(store, folder)
            published.set()
        assert collected == 0
        (root,) = store.roots()
        assert root.cid == result.cid and root.complete
        assert (await store.verify()).ok
        assert store._protected == {}  # released: later gcs see them as any other block


async def test_gc_while_a_fetch_writes_leaves_its_temporary_files(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Review finding: gc removed a fetch's temporary block file in blocks/tmp and the fetch
    # failed with "No such file or directory: .../blocks/tmp/.lattica-....tmp".
    data = random_bytes(8 * KIB, 82)
    with open_store(tmp_path / "store") as store:
        real = store.write_block_file
        survived: list[bool] = []

        def write_while_gc_runs(digest: bytes, data: bytes, *, durable: bool = True) -> None:
            live = store.tmp_dir / ".lattica-live.tmp"  # what write_file_atomically has open now
            live.write_bytes(b"half")
            store._remove_orphans()  # what gc does on its thread meanwhile
            survived.append(live.exists())
            live.unlink()
            real(digest, data, durable=durable)

        monkeypatch.setattr(store, "write_block_file", write_while_gc_runs)
        written = await trio.to_thread.run_sync(store.write_unindexed, [(data, blake3_digest(data))])
        await store.index_written(written)
        assert survived == [True]
        (store.tmp_dir / "left-by-a-crash.tmp").write_bytes(b"x")
        assert (await store.gc()).orphans_removed == 1  # with no writer running, tmp/ is cleaned


async def test_gc_keeps_an_unpinned_root_while_a_fetch_of_it_runs(tmp_path: Path) -> None:
    # Review finding: unpin then gc during a fetch threw the fetched data away.
    with open_store(tmp_path / "store") as store:
        result = await publish(store, _folder(tmp_path / "a", {"x.bin": random_bytes(5000, 83)}))
        store.fetch_started(result.cid)
        await store.set_pinned(result.cid, False)
        report = await store.gc()
        assert (report.roots_removed, report.blocks_removed) == (0, 0)
        store.fetch_ended(result.cid)
        assert (await store.gc()).roots_removed == 1
