"""What a fetch asks for: whole files by glob, or only the chunks of selected tensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattica.content import (
    ChunkMismatchError,
    ContentConfig,
    Manifest,
    NoFilesSelectedError,
    NoTensorsSelectedError,
    OutputConflictError,
    UnsafePathError,
)
from lattica.content.block_store import BlockStore
from lattica.content.cid import Cid
from lattica.content.exchange_fetch import FetchDeps, _open_folder, fetch_content, plan_fetch
from lattica.content.manifest import encode_manifest
from lattica.content.publish import publish
from lattica.identity import PeerId
from lattica.net.stream import QuicStream
from tests.unit.content_samples import KIB, lying_manifest, open_store, safetensors_bytes, tensors


async def _manifest(tmp_path: Path) -> Manifest:
    folder = tmp_path / "m"
    folder.mkdir()
    arrays = tensors(3, {"encoder.layer.0.w": (64, 256), "encoder.layer.1.w": (64, 256), "head": (16,)})
    (folder / "model.safetensors").write_bytes(safetensors_bytes(arrays))
    (folder / "config.json").write_bytes(b"{}")
    with open_store(tmp_path / "store") as store:
        return (await publish(store, folder, config=ContentConfig(chunk_bytes=64 * KIB))).manifest


async def test_globs_pick_whole_files(tmp_path: Path) -> None:
    manifest = await _manifest(tmp_path)
    plan = plan_fetch(manifest, include=["*.json"])
    assert [f.path for f in plan.files] == ["config.json"] and not plan.selections
    assert plan.chunks == {c.digest: c.length for c in manifest.file("config.json").chunks}
    everything = plan_fetch(manifest)
    assert everything.chunks == manifest.unique_chunks()
    assert [f.path for f in plan_fetch(manifest, exclude=["*.safetensors"]).files] == ["config.json"]


async def test_tensor_patterns_take_only_their_chunks(tmp_path: Path) -> None:
    manifest = await _manifest(tmp_path)
    weights = manifest.file("model.safetensors")
    plan = plan_fetch(manifest, tensors=["encoder.layer.0.*"])
    assert [f.path for f in plan.files] == ["config.json"]  # other files still come whole
    (selection,) = plan.selections
    assert [t.name for t in selection.tensors] == ["encoder.layer.0.w"]
    tensor_chunks = {c.digest for c in selection.chunks}
    assert tensor_chunks <= set(plan.chunks) and len(tensor_chunks) < len(weights.chunks)
    with pytest.raises(NoTensorsSelectedError):
        plan_fetch(manifest, tensors=["decoder.*"])


def _local_deps(store: BlockStore) -> FetchDeps:
    """Deps of a fetch whose content is all held here: it never opens a stream."""

    async def no_stream(peer: PeerId, protocol_id: str) -> QuicStream:
        raise AssertionError("a fetch of held content opened a stream")

    async def no_peers(cid: Cid) -> list[PeerId]:
        return []

    return FetchDeps(store, ContentConfig(), no_stream, no_peers)


async def test_a_tensors_fetch_does_not_follow_a_symlink_out_of_the_output_folder(tmp_path: Path) -> None:
    # Review finding: `fetch -o DIR --tensors` followed DIR/sub -> elsewhere and wrote there.
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    arrays = tensors(3, {"encoder.layer.0.w": (64, 64), "head": (16,)})
    (src / "sub" / "model.safetensors").write_bytes(safetensors_bytes(arrays))
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    with open_store(tmp_path / "store") as store:
        cid = (await publish(store, src)).cid
        with pytest.raises(UnsafePathError, match="symlink"):
            await fetch_content(_local_deps(store), cid, out_dir=out, tensors=["encoder.*"])
        assert list(elsewhere.iterdir()) == []
        (out / "sub").unlink()
        await fetch_content(_local_deps(store), cid, out_dir=out, tensors=["encoder.*"])
    assert (out / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("export", [True, False])
async def test_a_manifest_whose_file_sha256_lies_is_marked_failed_unpinned_and_collectable(
    tmp_path: Path, export: bool
) -> None:
    # Review finding: the fetch failed "SHA-256 differs" but the root stayed pinned and
    # "complete" forever (gc never freed it, ls showed nothing wrong).
    with open_store(tmp_path / "store") as store:
        cid, _real = await lying_manifest(tmp_path, store)
        with pytest.raises(ChunkMismatchError, match="SHA-256 differs"):
            await fetch_content(_local_deps(store), cid, out_dir=tmp_path / "out" if export else None)
        (root,) = [r for r in store.roots() if r.cid == cid]
        assert not root.pinned and root.failed is not None and "SHA-256" in root.failed
        assert store.file_sha256_mismatches(store.manifest(cid).files) == ["model.safetensors"]
        assert (await store.gc()).roots_removed == 2  # the lie and the unpinned tampered publish
        assert store.roots() == []


async def test_a_fetch_that_fails_after_its_manifest_arrived_leaves_no_pin(tmp_path: Path) -> None:
    # Review finding: any failure after the manifest was stored left the root pinned forever.
    with open_store(tmp_path / "store") as store:
        folder = tmp_path / "m"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors(2, {"w": (8, 8)})))
        cid = (await publish(store, folder, pinned=False)).cid
        with pytest.raises(NoTensorsSelectedError):
            await fetch_content(_local_deps(store), cid, tensors=["nomatch.*"])
        assert [r.pinned for r in store.roots()] == [False]


async def test_globs_that_match_no_file_fail_the_fetch(tmp_path: Path) -> None:
    # Review finding: `fetch --include nomatch` exited 0 having fetched 0 B.
    manifest = await _manifest(tmp_path)
    with pytest.raises(NoFilesSelectedError, match="nomatch"):
        plan_fetch(manifest, include=["nomatch"])
    with pytest.raises(NoFilesSelectedError):
        plan_fetch(manifest, exclude=["*"])
    with open_store(tmp_path / "store") as store, pytest.raises(NoFilesSelectedError):
        await fetch_content(_local_deps(store), Cid.for_manifest(encode_manifest(manifest)), include=["nomatch"])


def test_an_output_path_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    # Review finding: `-o` naming an existing file gave "[Errno 17] File exists".
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputConflictError, match="is a file, not a folder"):
        _open_folder(tmp_path / "afile", tmp_path / "store")
    with pytest.raises(OutputConflictError, match="cannot create the output folder"):
        _open_folder(tmp_path / "afile" / "sub", tmp_path / "store")
