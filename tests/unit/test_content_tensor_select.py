"""Tensor selection: the chunks of the selected tensors, and a safetensors file of just them
that the reference reader loads."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file

from lattica.content import (
    ChunkRef,
    ContentConfig,
    ContentError,
    FileEntry,
    NoTensorsSelectedError,
    blake3_digest,
    parse_safetensors,
    plan_chunks,
)
from lattica.content.publish import publish
from lattica.content.tensor_select import select_tensors, write_selected_safetensors
from tests.unit.content_samples import KIB, fuzz, open_store, safetensors_bytes, tensors

CONFIG = ContentConfig(chunk_bytes=64 * KIB)


def _layers() -> dict[str, np.ndarray]:
    spec: dict[str, tuple[int, ...]] = {"embeddings.word": (500, 64)}  # 125 KiB: large
    for layer in range(3):
        spec[f"encoder.layer.{layer}.attention.weight"] = (64, 64)  # 16 KiB: small
        spec[f"encoder.layer.{layer}.attention.bias"] = (64,)
        spec[f"encoder.layer.{layer}.ffn.weight"] = (64, 300)  # 75 KiB: large
    arrays = tensors(5, spec)
    arrays["encoder.layer.1.mask"] = np.array([1, 0, 1], dtype=np.int8)
    return arrays


async def test_selected_tensors_are_written_as_a_valid_file(tmp_path: Path) -> None:
    arrays = _layers()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(safetensors_bytes(arrays, {"format": "pt"}))
    with open_store(tmp_path / "store") as store:
        manifest = (await publish(store, folder, config=CONFIG)).manifest
        entry = manifest.file("model.safetensors")
        selection = select_tensors(entry, ["encoder.layer.1.*"])
        wanted = sorted(n for n in arrays if n.startswith("encoder.layer.1."))
        assert sorted(t.name for t in selection.tensors) == wanted
        # Only chunks holding bytes of the selected tensors, and every byte of them.
        for chunk in selection.chunks:
            assert any(t.begin < chunk.offset + chunk.length and chunk.offset < t.end for t in selection.tensors)
        assert selection.chunk_bytes < entry.size // 2
        out = tmp_path / "layer1.safetensors"
        size = write_selected_safetensors(selection, store.read_block, out)
    assert out.stat().st_size == size
    loaded = load_file(str(out))
    assert sorted(loaded) == wanted
    for name in wanted:
        assert loaded[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(loaded[name], arrays[name])
    with safe_open(str(out), framework="numpy") as reader:
        assert reader.metadata() == {"format": "pt"}
    index = parse_safetensors(out.read_bytes())  # our own parser agrees: contiguous, no gaps
    assert index.header_bytes % 8 == 0


async def test_several_patterns_and_large_tensors(tmp_path: Path) -> None:
    arrays = _layers()
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(safetensors_bytes(arrays))
    with open_store(tmp_path / "store") as store:
        entry = (await publish(store, folder, config=CONFIG)).manifest.file("model.safetensors")
        selection = select_tensors(entry, ["embeddings.*", "*.2.ffn.weight"])
        chosen = {"embeddings.word", "encoder.layer.2.ffn.weight"}
        assert entry.safetensors is not None
        assert [t.name for t in selection.tensors] == [t.name for t in entry.safetensors.tensors if t.name in chosen]
        # Large tensors: exactly their own chunks.
        assert selection.chunk_bytes == arrays["embeddings.word"].nbytes + arrays["encoder.layer.2.ffn.weight"].nbytes
        out = tmp_path / "sel.safetensors"
        write_selected_safetensors(selection, store.read_block, out)
    loaded = load_file(str(out))
    assert set(loaded) == {"embeddings.word", "encoder.layer.2.ffn.weight"}
    np.testing.assert_array_equal(loaded["embeddings.word"], arrays["embeddings.word"])


async def test_no_match_and_non_safetensors_are_typed_errors(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors(1, {"w": (4,)})))
    (folder / "config.json").write_bytes(b"{}")
    with open_store(tmp_path / "store") as store:
        manifest = (await publish(store, folder)).manifest
    with pytest.raises(NoTensorsSelectedError):
        select_tensors(manifest.file("model.safetensors"), ["decoder.*"])
    with pytest.raises(ContentError):
        select_tensors(manifest.file("config.json"), ["*"])


_DTYPES = [np.float32, np.float16, np.int8, np.int64, np.uint8, np.bool_]


@settings(fuzz, max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 40), min_size=0, max_size=3)),
        min_size=1,
        max_size=8,
    ),
    st.data(),
    st.sampled_from([4 * KIB, 8 * KIB]),
)
def test_any_selection_writes_a_file_the_reference_reader_loads(
    specs: list[tuple[type, list[int]]], data: st.DataObject, chunk_bytes: int
) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": np.asarray(rng.random(shape) * 100).astype(dtype) for i, (dtype, shape) in enumerate(specs)}
    blob = safetensors_bytes(arrays)
    index = parse_safetensors(blob)
    chunks = tuple(
        ChunkRef(blake3_digest(blob[o : o + n]), o, n) for o, n in plan_chunks(len(blob), chunk_bytes, index)
    )
    by_digest = {c.digest: blob[c.offset : c.offset + c.length] for c in chunks}
    entry = FileEntry("m.safetensors", len(blob), 0o644, b"\0" * 32, chunks, index)
    chosen = data.draw(st.lists(st.sampled_from(sorted(arrays)), min_size=1, unique=True))
    selection = select_tensors(entry, chosen)
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "sel.safetensors"
        write_selected_safetensors(selection, lambda d, o, n: by_digest[d][o : o + n], out)
        loaded = load_file(str(out))
    assert sorted(loaded) == sorted(chosen)
    for name in chosen:
        np.testing.assert_array_equal(loaded[name], arrays[name])
    needed = {c.digest for c in selection.chunks}
    for tensor in (t for t in selection.tensors if t.nbytes):
        assert all(
            c.digest in needed for c in entry.chunks if c.offset < tensor.end and tensor.begin < c.offset + c.length
        )
