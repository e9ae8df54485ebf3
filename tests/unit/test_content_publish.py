"""Publishing files and folders: manifests, modes, symlinks, dedupe, determinism."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import trio

from lattica.content import (
    ChunkNotFoundError,
    ContentConfig,
    ContentError,
    MalformedSafetensorsError,
    UnsafePathError,
    manifest_cid,
)
from lattica.content import publish as publish_module
from lattica.content.export import export
from lattica.content.publish import LocalFile, publish
from tests.conftest import MakeTmpfs
from tests.unit.content_samples import KIB, open_store, random_bytes, safetensors_bytes, tensors

SMALL_CHUNKS = ContentConfig(chunk_bytes=64 * KIB)
COPYING = ContentConfig(chunk_bytes=64 * KIB, publish_link=False)


def _model(root: Path, arrays: dict[str, np.ndarray], extra: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(safetensors_bytes(arrays, {"format": "pt"}))
    (root / "config.json").write_bytes(b'{"hidden": 8}')
    for name, data in (extra or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


async def test_publish_a_model_folder(tmp_path: Path) -> None:
    arrays = tensors(1, {"encoder.layer.0.w": (200, 256), "encoder.layer.0.b": (256,), "head": (10,)})
    folder = _model(tmp_path / "m", arrays, {"1_Pooling/config.json": b"{}", "run.sh": b"#!/bin/sh\n"})
    (folder / "run.sh").chmod(0o750)
    with open_store(tmp_path / "store") as store:
        result = await publish(store, folder, tags=("bert", "bert", "a"), config=SMALL_CHUNKS)
        manifest = result.manifest
        assert manifest.name == "m" and manifest.tags == ("a", "bert") and manifest.chunk_bytes == 64 * KIB
        assert [f.path for f in manifest.files] == [
            "1_Pooling/config.json",
            "config.json",
            "model.safetensors",
            "run.sh",
        ]
        for entry in manifest.files:
            data = (folder / entry.path).read_bytes()
            assert entry.size == len(data)
            assert entry.sha256 == hashlib.sha256(data).digest()  # what an HF LFS pointer carries
            assert b"".join(store.iter_file(entry.chunks)) == data
        assert manifest.file("run.sh").mode == 0o755 and manifest.file("config.json").mode == 0o644
        weights = manifest.file("model.safetensors")
        assert weights.safetensors is not None
        assert {t.name for t in weights.safetensors.tensors} == set(arrays)
        assert weights.safetensors.metadata == {"format": "pt"}
        assert manifest.file("config.json").safetensors is None
        assert result.cid == manifest_cid(manifest)
        assert store.manifest(result.cid) == manifest
        assert [(r.cid, r.name, r.total_bytes, r.pinned) for r in store.roots()] == [
            (result.cid, "m", manifest.total_bytes, True)
        ]
        assert result.new_bytes == sum(manifest.unique_chunks().values())


async def test_same_content_same_id_in_any_store(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", tensors(2, {"w": (300, 300)}))
    with open_store(tmp_path / "one") as one, open_store(tmp_path / "two") as two:
        first = await publish(one, folder, config=SMALL_CHUNKS)
        again = await publish(one, folder, config=SMALL_CHUNKS)
        elsewhere = await publish(two, folder, config=SMALL_CHUNKS)
    assert first.cid == again.cid == elsewhere.cid
    assert again.new_chunks == 0 and again.new_bytes == 0
    (folder / "config.json").write_bytes(b'{"hidden": 9}')
    with open_store(tmp_path / "three") as three:
        assert (await publish(three, folder, config=SMALL_CHUNKS)).cid != first.cid


async def test_two_models_sharing_a_tensor_share_its_chunks_on_disk(tmp_path: Path) -> None:
    shared = tensors(3, {"encoder.big": (400, 256)})["encoder.big"]  # 400 KiB
    base = _model(tmp_path / "base", {"embed": np.ones(1000, np.float32), "encoder.big": shared})
    tuned = _model(tmp_path / "tuned", {"adapter": np.zeros(3000, np.float32), "encoder.big": shared, "z": np.ones(7)})
    with open_store(tmp_path / "store") as store:
        first = await publish(store, base, config=SMALL_CHUNKS)
        second = await publish(store, tuned, config=SMALL_CHUNKS)
    assert shared.nbytes <= first.new_bytes
    # Everything of the shared tensor was already stored: the second model added at most its
    # other tensors, header and config (a few chunks), not the 400 KiB tensor.
    assert second.new_bytes < shared.nbytes // 4
    shared_chunks = {c.digest for c in first.manifest.file("model.safetensors").chunks} & {
        c.digest for c in second.manifest.file("model.safetensors").chunks
    }
    assert len(shared_chunks) == -(-shared.nbytes // (64 * KIB))


async def test_a_single_file_is_published_under_its_name(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(random_bytes(150 * KIB, 1))
    with open_store(tmp_path / "store") as store:
        result = await publish(store, path, name="my weights", config=SMALL_CHUNKS)
    assert [f.path for f in result.manifest.files] == ["weights.bin"]
    assert result.manifest.name == "my weights"
    assert [c.length for c in result.manifest.files[0].chunks] == [64 * KIB, 64 * KIB, 22 * KIB]


async def test_symlink_inside_the_tree_is_published_as_its_content(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "abc").write_bytes(b"tokenizer")
    (folder / "tokenizer.json").symlink_to("blobs/abc")
    with open_store(tmp_path / "store") as store:
        manifest = (await publish(store, folder)).manifest
    assert manifest.file("tokenizer.json").sha256 == hashlib.sha256(b"tokenizer").digest()


@pytest.mark.parametrize("kind", ["file-out", "dir-link", "fifo", "dangling"])
async def test_unsafe_trees_are_refused(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "ok.txt").write_bytes(b"ok")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    if kind == "file-out":
        (folder / "leak").symlink_to(secret)
    elif kind == "dir-link":
        (folder / "loop").symlink_to(folder)
    elif kind == "fifo":
        os.mkfifo(folder / "pipe")
    else:
        (folder / "gone").symlink_to(tmp_path / "missing")
    with open_store(tmp_path / "store") as store:
        with pytest.raises(UnsafePathError):
            await publish(store, folder)
        assert store.roots() == []


async def test_case_only_duplicates_are_refused_on_publish(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_bytes(b"a")
    (folder / "readme.md").write_bytes(b"b")
    with open_store(tmp_path / "store") as store, pytest.raises(UnsafePathError, match="case"):
        await publish(store, folder)


async def test_too_many_files_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for number in range(5):
        (folder / f"f{number}").write_bytes(b"x")
    with open_store(tmp_path / "store") as store, pytest.raises(ContentError, match="more than 4 files"):
        await publish(store, folder, config=ContentConfig(max_files=4))


async def test_a_hostile_safetensors_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    with open_store(tmp_path / "store") as store, pytest.raises(MalformedSafetensorsError, match="cap"):
        await publish(store, folder)


async def test_new_blocks_are_flushed_to_disk_before_they_are_indexed(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder = _model(tmp_path / "m", tensors(4, {"w": (300, 300)}))
    events: list[str] = []
    with open_store(tmp_path / "store") as store:
        real_sync, real_index = store.sync_to_disk, store.index_blocks

        def sync() -> None:
            events.append("sync")
            real_sync()

        async def index(blocks):  # type: ignore[no-untyped-def]
            events.append(f"index {len(blocks)}")
            await real_index(blocks)

        monkeypatch.setattr(store, "sync_to_disk", sync)
        monkeypatch.setattr(store, "index_blocks", index)
        await publish(store, folder, config=COPYING)
    # config.json then model.safetensors: each file's blocks flushed once, then indexed.
    assert events[:2] == ["sync", "index 1"]
    assert events[2] == "sync" and events[3].startswith("index ") and int(events[3].split()[1]) > 1


async def test_publishing_a_large_file_never_holds_it_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with path.open("wb") as file:
        for number in range(48):
            file.write(random_bytes(1 << 20, 100 + number))
    with open_store(tmp_path / "store") as store:
        tracemalloc.start()
        try:
            await publish(store, path)  # 48 chunks of 1 MiB
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        out = tmp_path / "out"
        tracemalloc.start()
        try:
            await export(store, store.manifest(store.roots()[0].cid), out)
            _, export_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (out / "big.bin").stat().st_size == 48 << 20
    # A chunk or two in flight, never the 48 MiB file.
    assert peak < 4 << 20, peak
    assert export_peak < 4 << 20, export_peak


async def test_a_published_file_is_linked_not_copied_and_an_edit_is_never_served(tmp_path: Path) -> None:
    data = random_bytes(5 * 64 * KIB, 21)
    (tmp_path / "m").mkdir()
    source = tmp_path / "m" / "w.bin"
    source.write_bytes(data)
    with open_store(tmp_path / "store") as store:
        result = await publish(store, source, config=SMALL_CHUNKS)
        assert result.new_chunks == 5 and result.new_bytes == len(data)
        (linked,) = store.files_dir.iterdir()
        assert linked.stat().st_ino == source.stat().st_ino  # the same bytes on disk, once
        blocks = [p for p in store.root.iterdir() if len(p.name) == 2 for p in p.iterdir()]
        assert len(blocks) == 1  # the manifest only
        chunks = result.manifest.files[0].chunks
        with source.open("r+b") as edit:  # edited in place after the publish
            edit.seek(2 * 64 * KIB)
            edit.write(b"changed")
        assert store.read_block(chunks[1].digest) == data[64 * KIB : 2 * 64 * KIB]
        with pytest.raises(ChunkNotFoundError, match="changed on disk"):
            store.read_block(chunks[2].digest)
        assert store.missing(c.digest for c in chunks) == [chunks[2].digest]


async def test_a_file_on_another_file_system_is_copied(tmp_path: Path, make_tmpfs: MakeTmpfs) -> None:
    data = random_bytes(3 * 64 * KIB, 22)
    source = make_tmpfs(8) / "w.bin"
    source.write_bytes(data)
    with open_store(tmp_path / "store") as store:
        result = await publish(store, source, config=SMALL_CHUNKS)
        assert result.new_bytes == len(data) and list(store.files_dir.iterdir()) == []
        source.unlink()
        assert b"".join(store.read_block(c.digest) for c in result.manifest.files[0].chunks) == data


def _swap_after_walk(monkeypatch: pytest.MonkeyPatch, swap: Callable[[Path], None]) -> None:
    """Make publish see a file replaced between the walk and the read of its bytes."""
    real = publish_module.collect_files

    def collect_then_swap(target: Path, **limits: int) -> list[LocalFile]:
        found = real(target, **limits)
        swap(found[0].source)
        return found

    monkeypatch.setattr(publish_module, "collect_files", collect_then_swap)


async def test_a_file_swapped_for_a_fifo_after_the_walk_is_refused_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review finding: the file was opened by name, so a FIFO swapped in blocked the open forever
    # on a worker thread holding the store's write lock. If the open blocks, the guard below
    # opens the FIFO's write end after a bounded wait: the test then fails, it does not hang.
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"weights")

    def fifo_instead(source: Path) -> None:
        source.unlink()
        os.mkfifo(source)

    _swap_after_walk(monkeypatch, fifo_instead)
    unblocked = False
    published = trio.Event()

    async def unblock_a_waiting_open() -> None:
        nonlocal unblocked
        with trio.move_on_after(10):
            await published.wait()
            return
        with contextlib.suppress(OSError):  # ENXIO: nobody has it open for reading
            os.close(os.open(folder / "a.bin", os.O_WRONLY | os.O_NONBLOCK))
            unblocked = True

    with open_store(tmp_path / "store") as store:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(unblock_a_waiting_open)
            try:
                swapped = r"a\.bin changed while it was published \(no longer the regular file"
                with pytest.raises(ContentError, match=swapped):
                    await publish(store, folder)
            finally:
                published.set()
        assert not unblocked, "publish blocked opening the FIFO"
        async with store.writing():  # the store's write lock is free again
            pass


@pytest.mark.parametrize("swap", ["other-file", "symlink"])
async def test_a_file_replaced_after_the_walk_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"walked")
    (tmp_path / "other.bin").write_bytes(b"planted")

    def replace(source: Path) -> None:
        if swap == "symlink":
            source.unlink()
            source.symlink_to(tmp_path / "other.bin")
        else:
            # Renamed over it while the walked file still exists: a new inode, not a reused one.
            (tmp_path / "other.bin").rename(source)

    _swap_after_walk(monkeypatch, replace)
    with open_store(tmp_path / "store") as store, pytest.raises(ContentError, match="changed while it was published"):
        await publish(store, folder)
