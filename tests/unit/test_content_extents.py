"""Chunks held as extents of fetched files: a fetch into a folder writes each byte once, the
store reads it back from the output file's second name under ``blocks/files/``, checks it on
every whole read, drops what a user changed, and never touches the user's file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lattica.content import ChunkNotFoundError, ContentConfig, block_store
from lattica.content.block_store import MAX_EXTENT_BYTES, BlockStore, Extent
from lattica.content.blocking_io import run_blocking
from lattica.content.cid import blake3_digest
from lattica.content.contained_write import open_output_folder
from lattica.content.file_assembly import FileAssembly
from lattica.content.manifest import ChunkRef, FileEntry
from lattica.content.publish import publish
from tests.unit.content_samples import KIB, open_store, random_bytes

TAG = "00112233aabbccdd"
CHUNK = 64 * KIB


def entry(path: str, data: bytes) -> FileEntry:
    chunks = tuple(
        ChunkRef(blake3_digest(data[at : at + CHUNK]), at, len(data[at : at + CHUNK]))
        for at in range(0, len(data), CHUNK)
    )
    return FileEntry(path, len(data), 0o644, hashlib.sha256(data).digest(), chunks)


def assemble(store: BlockStore, out: Path, file: FileEntry, data: bytes, *, upto: int | None = None) -> FileAssembly:
    """Write the file's chunks (all, or the first ``upto``) the way a fetch does; returns the
    assembly (finished when every chunk was written)."""
    with open_output_folder(out) as fd:
        assembly = FileAssembly(fd, out, [file], tag=TAG, adopt=store.adopt_file)
        held = [c.digest for c in file.chunks if store.has(c.digest)]
        assembly.add_held(held, store.read_block)
        for chunk in file.chunks[:upto]:
            if not store.has(chunk.digest):
                assembly.add(chunk.digest, data[chunk.offset : chunk.offset + chunk.length])
        if upto is None:
            assembly.finish()
        else:
            assembly.discard()  # what a killed fetch leaves, but for the temporary name
        return assembly


async def fetch_into(store: BlockStore, out: Path, file: FileEntry, data: bytes, *, upto: int | None = None) -> None:
    assembly = await run_blocking(lambda: assemble(store, out, file, data, upto=upto))
    await store.index_written([], assembly.take_extents())
    store.release_files(assembly.linked_names)


def block_files(store: BlockStore) -> list[Path]:
    return [p for p in store.root.iterdir() if len(p.name) == 2 for p in p.iterdir()]


async def test_a_fetched_file_is_written_once_and_its_chunks_read_from_it(tmp_path: Path) -> None:
    data = random_bytes(5 * CHUNK + 123, 1)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store:
        await fetch_into(store, tmp_path / "out", file, data)
        output = tmp_path / "out" / "model.bin"
        assert output.read_bytes() == data
        (linked,) = store.files_dir.iterdir()
        assert linked.stat().st_ino == output.stat().st_ino and output.stat().st_nlink == 2
        assert block_files(store) == []  # no second copy
        assert store.missing(c.digest for c in file.chunks) == []
        for chunk in file.chunks:
            piece = data[chunk.offset : chunk.offset + chunk.length]
            assert store.read_block(chunk.digest) == piece
            assert store.read_block(chunk.digest, 7, 10) == piece[7:17]
            assert store.read_start(chunk.digest, 1 << 20) == (chunk.length, piece)
            if chunk.length > 1000:
                with pytest.raises(ValueError):  # an extent is never served in unchecked steps
                    store.read_start(chunk.digest, 1000)
        assert (await store.verify()).ok


async def test_a_chunk_changed_in_the_output_file_is_dropped_never_read(tmp_path: Path) -> None:
    data = random_bytes(4 * CHUNK, 2)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store:
        await fetch_into(store, tmp_path / "out", file, data)
        output = tmp_path / "out" / "model.bin"
        with output.open("r+b") as edit:  # a user edits the fetched file in place
            edit.seek(CHUNK + 10)
            edit.write(b"edited")
        changed, intact = file.chunks[1], file.chunks[2]
        with pytest.raises(ChunkNotFoundError, match="changed on disk"):
            store.read_start(changed.digest, 1 << 20)
        assert store.missing([changed.digest, intact.digest]) == [changed.digest]
        assert store.read_block(intact.digest) == data[2 * CHUNK : 3 * CHUNK]
        # The store never writes to the user's file: the edit is still there.
        assert output.read_bytes()[CHUNK + 10 : CHUNK + 16] == b"edited"
        with pytest.raises(ChunkNotFoundError):
            store.read_block(changed.digest)


async def test_verify_drops_a_changed_extent_and_leaves_the_users_file(tmp_path: Path) -> None:
    data = random_bytes(3 * CHUNK, 3)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store:
        await fetch_into(store, tmp_path / "out", file, data)
        output = tmp_path / "out" / "model.bin"
        with output.open("r+b") as edit:
            edit.write(b"X")
        report = await store.verify(drop_bad=True)
        assert report.bad == (file.chunks[0].digest,)
        assert output.read_bytes()[:1] == b"X" and output.stat().st_size == len(data)
        assert store.missing(c.digest for c in file.chunks) == [file.chunks[0].digest]


async def test_gc_unlinks_the_stores_name_only_and_keeps_it_while_referenced(tmp_path: Path) -> None:
    data = random_bytes(3 * CHUNK, 4)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store:
        await fetch_into(store, tmp_path / "out", file, data)
        store.protect(c.digest for c in file.chunks)  # referenced, as a root would
        await store.gc()
        assert len(list(store.files_dir.iterdir())) == 1
        store.unprotect(c.digest for c in file.chunks)
        report = await store.gc()
        assert report.blocks_removed == len(file.chunks)
        assert list(store.files_dir.iterdir()) == []
        assert (tmp_path / "out" / "model.bin").read_bytes() == data  # the user's copy stays


async def test_gc_during_a_fetch_keeps_the_file_it_is_writing(tmp_path: Path) -> None:
    data = random_bytes(2 * CHUNK, 5)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store, open_output_folder(tmp_path / "out") as fd:
        assembly = FileAssembly(fd, tmp_path / "out", [file], tag=TAG, adopt=store.adopt_file)
        first = file.chunks[0]
        assembly.add(first.digest, data[: first.length])  # written, not indexed yet
        await store.gc()
        (name,) = assembly.linked_names
        assert (store.files_dir / name).exists()
        await store.index_written([], assembly.take_extents())
        assert store.read_block(first.digest) == data[: first.length]
        assembly.discard()
        store.release_files(assembly.linked_names)


async def test_a_resumed_file_takes_over_the_chunks_and_the_killed_tries_file_goes(tmp_path: Path) -> None:
    data = random_bytes(6 * CHUNK, 6)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store:
        await fetch_into(store, tmp_path / "out", file, data, upto=3)  # killed after 3 chunks
        (killed,) = store.files_dir.iterdir()
        assert store.missing(c.digest for c in file.chunks) == [c.digest for c in file.chunks[3:]]
        await fetch_into(store, tmp_path / "out", file, data)  # the restart: 3 copied, 3 fetched
        assert (tmp_path / "out" / "model.bin").read_bytes() == data
        (kept,) = store.files_dir.iterdir()
        assert kept != killed and kept.stat().st_ino == (tmp_path / "out" / "model.bin").stat().st_ino
        assert all(store.read_block(c.digest) == data[c.offset : c.offset + c.length] for c in file.chunks)


async def test_block_files_held_before_give_way_to_the_fetched_file(tmp_path: Path) -> None:
    data = random_bytes(3 * CHUNK, 7)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store:
        for chunk in file.chunks:
            await store.put(data[chunk.offset : chunk.offset + chunk.length])
        assert len(block_files(store)) == 3
        await fetch_into(store, tmp_path / "out", file, data)  # every chunk held: copied in
        store.protect(c.digest for c in file.chunks)
        await store.gc()
        assert block_files(store) == []  # held once, in the output file
        assert all(store.read_block(c.digest) == data[c.offset : c.offset + c.length] for c in file.chunks)


def test_a_file_the_store_cannot_link_records_no_extents(tmp_path: Path) -> None:
    data = random_bytes(2 * CHUNK, 8)
    file = entry("model.bin", data)
    with open_output_folder(tmp_path / "out") as fd:
        assembly = FileAssembly(fd, tmp_path / "out", [file], tag=TAG, adopt=lambda _fd: None)
        for chunk in file.chunks:
            assembly.add(chunk.digest, data[chunk.offset : chunk.offset + chunk.length])
        assert not any(assembly.is_placed(c.digest) for c in file.chunks)
        assert assembly.take_extents() == []
        assert assembly.finish() == [tmp_path / "out" / "model.bin"]


def test_an_extent_names_a_range_of_a_file() -> None:
    extent = Extent(b"\x01" * 32, 10, "ab" * 16, 20)
    assert (extent.length, extent.offset) == (10, 20)


async def test_chunks_longer_than_one_serving_read_stay_block_files(tmp_path: Path) -> None:
    # Review finding: a 2 MiB chunk held as an extent was hashed whole, then served in 1 MiB
    # reads, so an edit between the hash and the second read was sent unchecked.
    big = 2 * MAX_EXTENT_BYTES
    data = random_bytes(2 * big + 5, 9)
    chunks = tuple(
        ChunkRef(blake3_digest(data[at : at + big]), at, len(data[at : at + big])) for at in range(0, len(data), big)
    )
    file = FileEntry("model.bin", len(data), 0o644, hashlib.sha256(data).digest(), chunks)
    with open_store(tmp_path / "store") as store, open_output_folder(tmp_path / "out") as fd:
        assembly = FileAssembly(fd, tmp_path / "out", [file], tag=TAG, adopt=store.adopt_file)
        for chunk in chunks:
            assembly.add(chunk.digest, data[chunk.offset : chunk.offset + chunk.length])
        placed = [c.length for c in chunks if assembly.is_placed(c.digest)]
        assert placed == [5]  # only the short tail fits in one read
        assert [e.length for e in assembly.take_extents()] == [5]
        assembly.finish()


async def test_a_published_file_with_long_chunks_is_copied(tmp_path: Path) -> None:
    source = tmp_path / "w.bin"
    source.write_bytes(random_bytes(4 * MAX_EXTENT_BYTES, 10))  # two chunks of 2 MiB
    with open_store(tmp_path / "store") as store:
        result = await publish(store, source, config=ContentConfig(chunk_bytes=2 * MAX_EXTENT_BYTES))
        assert list(store.files_dir.iterdir()) == []  # nothing linked, nothing left behind
        assert len(block_files(store)) == 3  # two chunks and the manifest
        assert store.missing(c.digest for c in result.manifest.files[0].chunks) == []


async def test_an_unreadable_fetched_file_counts_as_missing_not_as_an_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Review finding: `chmod 000` on a fetched file (daemon not root) made every verify and
    # every fetch fail with "Permission denied" while ls said complete.
    data = random_bytes(3 * CHUNK, 11)
    file = entry("model.bin", data)
    with open_store(tmp_path / "store") as store:
        await fetch_into(store, tmp_path / "out", file, data)
        real_open = block_store._open_for_reading

        def denied(path: Path) -> int:
            if path.parent == store.files_dir:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path)

        monkeypatch.setattr(block_store, "_open_for_reading", denied)
        first, *others = file.chunks
        with pytest.raises(ChunkNotFoundError, match="cannot be read"):
            store.read_block(first.digest)
        assert store.missing([first.digest]) == [first.digest]  # dropped: fetched again
        report = await store.verify(drop_bad=True)
        assert set(report.missing) == {c.digest for c in others} and not report.bad
        assert store.missing(c.digest for c in file.chunks) == [c.digest for c in file.chunks]


def test_a_name_a_killed_fetch_left_in_the_store_goes_when_the_store_opens(tmp_path: Path) -> None:
    # Review finding: after kill -9 early in a fetch (nothing indexed yet), the fetch's file
    # (fallocated to its full size) kept its store name until gc, beside the next fetch's.
    out = tmp_path / "out.bin"
    with open_store(tmp_path / "store") as store:
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            name = store.adopt_file(fd)  # then the process dies: no index, no release
        finally:
            os.close(fd)
        assert name is not None and (store.files_dir / name).exists()
    with open_store(tmp_path / "store") as store:
        assert list(store.files_dir.iterdir()) == []
    assert out.exists()  # the user's name of the file stays


def test_another_users_file_is_not_linked(tmp_path: Path) -> None:
    # Review finding: a root daemon hard-linked files of other users (root is not bound by
    # fs.protected_hardlinks), so deleting them freed nothing on their disk until our gc.
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"someone else's")
    os.chown(theirs, 65534, 65534)
    with open_store(tmp_path / "store") as store:
        fd = os.open(theirs, os.O_RDONLY)
        try:
            assert store.adopt_file(fd) is None
        finally:
            os.close(fd)
        assert list(store.files_dir.iterdir()) == []


async def test_gc_moves_a_shared_chunk_out_of_a_big_file_the_user_deleted(tmp_path: Path) -> None:
    # Review finding: a small content's one chunk moved into a big fetched file that shares it;
    # after the big file was deleted and its content collected, gc kept all of it for that chunk.
    big = random_bytes(10 * CHUNK, 12)
    small, large = entry("small.bin", big[:CHUNK]), entry("large.bin", big)
    shared = small.chunks[0].digest
    with open_store(tmp_path / "store") as store:
        store.protect([shared])  # the small content's root, still held
        await fetch_into(store, tmp_path / "x", small, big[:CHUNK])
        await fetch_into(store, tmp_path / "y", large, big)
        (tmp_path / "y" / "large.bin").unlink()  # the user deletes the big file
        await store.gc()  # the big content is unpinned: its other chunks go
        assert list(store.files_dir.iterdir()) == []  # no 640 KiB file kept for 64 KiB
        assert store.read_block(shared) == big[:CHUNK]  # now a block file of its own
        assert store.block_path(shared).exists()
        assert (tmp_path / "x" / "small.bin").read_bytes() == big[:CHUNK]
