"""Tensor selection: the chunks of the selected tensors, and a safetensors file of just them
that the reference reader loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from lattica.content import ContentConfig, ContentError, NoTensorsSelectedError, parse_safetensors
from lattica.content.publish import publish
from lattica.content.tensor_select import select_tensors, write_selected_safetensors
from tests.unit.content_samples import KIB, open_store, safetensors_bytes, tensors

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
