"""Writing a manifest's files out of the block store: byte-identical, atomic, contained."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattica.content import ChunkMismatchError, ChunkNotFoundError, ContentConfig, UnsafePathError
from lattica.content.export import export, export_files, select_files
from lattica.content.file_assembly import temporary_name
from lattica.content.publish import publish
from lattica.content.tensor_select import select_tensors
from tests.unit.content_samples import KIB, open_store, random_bytes, safetensors_bytes, tensors


def _tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b"{}",
        "weights/a.bin": random_bytes(300 * KIB, 1),
        "weights/b.bin": b"b" * 10,
        "run.sh": b"#!",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "run.sh").chmod(0o755)
    return files


async def test_round_trip_is_byte_identical_with_modes(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    with open_store(tmp_path / "store") as store:
        result = await publish(store, tmp_path / "src")
        written = await export(store, result.manifest, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(files)
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert (tmp_path / "out" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o644
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


async def test_include_and_exclude_globs(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    with open_store(tmp_path / "store") as store:
        manifest = (await publish(store, tmp_path / "src")).manifest
    assert [f.path for f in select_files(manifest, include=["weights/*"])] == ["weights/a.bin", "weights/b.bin"]
    assert [f.path for f in select_files(manifest, exclude=["*.bin"])] == ["config.json", "run.sh"]
    assert [f.path for f in select_files(manifest, ["*"], ["weights/a*"])] == ["config.json", "run.sh", "weights/b.bin"]


async def test_a_symlink_planted_in_the_output_folder_is_not_followed(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").symlink_to(elsewhere)
    with open_store(tmp_path / "store") as store:
        manifest = (await publish(store, tmp_path / "src")).manifest
        with pytest.raises(UnsafePathError, match="symlink"):
            await export(store, manifest, out, include=["weights/*"])
    assert list(elsewhere.iterdir()) == []


async def test_missing_or_damaged_chunks_leave_no_file(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    with open_store(tmp_path / "store") as store:
        # Block files (a copy), so the damage is in the store's own copy, not the source.
        manifest = (await publish(store, tmp_path / "src", config=ContentConfig(publish_link=False))).manifest
        entry = manifest.file("weights/a.bin")
        damaged = store.block_path(entry.chunks[-1].digest)
        damaged.write_bytes(b"X" + damaged.read_bytes()[1:])
        with pytest.raises(ChunkMismatchError):
            await export(store, manifest, tmp_path / "out", include=["weights/a.bin"])
        assert list((tmp_path / "out" / "weights").iterdir()) == []
        await store.verify(drop_bad=True)
        with pytest.raises(ChunkNotFoundError):
            await export(store, manifest, tmp_path / "out", include=["weights/a.bin"])
        assert list((tmp_path / "out" / "weights").iterdir()) == []


async def test_a_tensor_selection_is_written_contained_with_the_manifest_mode(tmp_path: Path) -> None:
    # Review finding: `fetch --tensors` followed a symlink planted where a parent folder goes
    # and wrote outside -o; it must be refused like a whole-file export, and nothing written.
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    arrays = tensors(5, {"encoder.layer.0.w": (64, 64), "head": (16,)})
    (src / "sub" / "model.safetensors").write_bytes(safetensors_bytes(arrays))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    with open_store(tmp_path / "store") as store:
        manifest = (await publish(store, src)).manifest
        selection = select_tensors(manifest.file("sub/model.safetensors"), ["encoder.*"])
        with pytest.raises(UnsafePathError, match="symlink"):
            export_files(store, [], out, [selection])
        assert list(elsewhere.iterdir()) == []
        (out / "sub").unlink()
        (written,) = export_files(store, [], out, [selection])
    assert written == out / "sub" / "model.safetensors"
    assert written.stat().st_mode & 0o777 == 0o644
    assert not [p for p in out.rglob("*.tmp")]


async def test_a_tensor_selection_killed_mid_write_leaves_a_name_the_next_fetch_replaces(tmp_path: Path) -> None:
    # Review finding: kill -9 during a --tensors export left a 68 MiB randomly named .tmp that
    # nothing removed. With the fetch's tag the temporary name is known, and replaced.
    src = tmp_path / "src"
    src.mkdir()
    arrays = tensors(6, {"encoder.layer.0.w": (64, 64), "head": (16,)})
    (src / "model.safetensors").write_bytes(safetensors_bytes(arrays))
    out = tmp_path / "out"
    out.mkdir()
    tag = "0123456789abcdef"
    leftover = out / temporary_name("model.safetensors", tag)
    leftover.write_bytes(b"half a safetensors file from a killed fetch")
    with open_store(tmp_path / "store") as store:
        manifest = (await publish(store, src)).manifest
        selection = select_tensors(manifest.file("model.safetensors"), ["encoder.*"])
        (written,) = export_files(store, [], out, [selection], tag=tag)
    assert written == out / "model.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
