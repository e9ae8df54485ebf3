"""Chunk boundaries: fixed for ordinary files; tensor-aligned (and so dedupe-friendly) for
safetensors files."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lattica.content import blake3_digest, parse_safetensors, plan_chunks
from lattica.content.safetensors_header import SafetensorsIndex, TensorInfo
from tests.unit.content_samples import KIB, fuzz, safetensors_bytes, tensors


def test_fixed_chunks_cut_every_chunk_size() -> None:
    assert plan_chunks(0, 4) == []
    assert plan_chunks(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert plan_chunks(8, 4) == [(0, 4), (4, 4)]


def _index(header_bytes: int, sizes: list[int]) -> SafetensorsIndex:
    tensors, position = [], header_bytes
    for number, size in enumerate(sizes):
        tensors.append(TensorInfo(f"t{number}", "U8", (size,), position, position + size))
        position += size
    return SafetensorsIndex(header_bytes, tuple(tensors), None)


def test_tensor_aligned_rules() -> None:
    # header 10 bytes; chunk 100: small 30 + 50 packed, 40 does not fit, large 250, small 20, empty.
    index = _index(10, [30, 50, 40, 250, 20, 0])
    assert plan_chunks(10 + 390, 100, index) == [
        (0, 10),  # the header alone
        (10, 80),  # t0 + t1
        (90, 40),  # t2 (would not fit with t0 + t1)
        (130, 100),  # t3 (large) starts a chunk, full-size pieces
        (230, 100),
        (330, 50),  # ... its remainder alone
        (380, 20),  # t4
    ]


def test_large_header_is_cut_into_chunks_of_its_own() -> None:
    index = _index(250, [10])
    assert plan_chunks(260, 100, index) == [(0, 100), (100, 100), (200, 50), (250, 10)]


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[SafetensorsIndex, int]:
    chunk = draw(st.integers(1, 64))
    sizes = draw(st.lists(st.integers(0, 200), max_size=20))
    return _index(draw(st.integers(10, 150)), sizes), chunk


@fuzz
@given(_layouts())
def test_tensor_aligned_chunks_tile_the_file_and_keep_tensors_whole(layout: tuple[SafetensorsIndex, int]) -> None:
    index, chunk = layout
    size = index.tensors[-1].end if index.tensors else index.header_bytes
    plan = plan_chunks(size, chunk, index)
    position = 0
    for offset, length in plan:
        assert offset == position and 1 <= length <= chunk
        position += length
    assert position == size
    starts = {offset for offset, _ in plan}
    assert index.header_bytes in starts or size == index.header_bytes  # data never shares the header's chunk
    for tensor in index.tensors:
        if tensor.nbytes == 0:
            continue
        assert any(o <= tensor.begin and tensor.end <= o + n for o, n in plan) or tensor.nbytes > chunk
        if tensor.nbytes > chunk:
            assert tensor.begin in starts and (tensor.end in starts or tensor.end == size)


def _chunk_digests(data: bytes, chunk: int) -> list[bytes]:
    return [blake3_digest(data[o : o + n]) for o, n in plan_chunks(len(data), chunk, parse_safetensors(data))]


def test_a_shared_tensor_at_different_offsets_gives_identical_chunks() -> None:
    shared = tensors(7, {"encoder.big": (300, 256)})["encoder.big"]  # 300 KiB: large at 64 KiB chunks
    base = safetensors_bytes(
        {"embed": np.ones(100, np.float32), "encoder.big": shared, "head": np.zeros(10, np.float32)}
    )
    tuned = safetensors_bytes(
        {"aaa.new": tensors(8, {"x": (5000,)})["x"], "encoder.big": shared, "zz.head": np.ones(33, np.float32)},
        metadata={"fine_tuned": "yes"},
    )
    offset_base = next(t.begin for t in parse_safetensors(base).tensors if t.name == "encoder.big")
    offset_tuned = next(t.begin for t in parse_safetensors(tuned).tensors if t.name == "encoder.big")
    assert offset_base != offset_tuned
    chunk = 64 * KIB
    shared_digests = {blake3_digest(c) for c in _split(shared.tobytes(), chunk)}
    assert shared_digests <= set(_chunk_digests(base, chunk))
    assert shared_digests <= set(_chunk_digests(tuned, chunk))
    # Same file, same plan: deterministic.
    assert _chunk_digests(base, chunk) == _chunk_digests(bytes(base), chunk)


def _split(data: bytes, chunk: int) -> list[bytes]:
    return [data[o : o + chunk] for o in range(0, len(data), chunk)]


def test_fixed_chunking_would_not_share_the_tensor() -> None:
    # The point of tensor alignment: with fixed chunks the same tensor at a different offset
    # produces different chunks.
    shared = tensors(7, {"big": (300, 256)})["big"]
    a = safetensors_bytes({"a": np.ones(100, np.float32), "big": shared})
    b = safetensors_bytes({"a": np.ones(101, np.float32), "big": shared})
    fixed = lambda data: {blake3_digest(data[o : o + n]) for o, n in plan_chunks(len(data), 64 * KIB)}  # noqa: E731
    assert not fixed(a) & fixed(b)
    assert set(_chunk_digests(a, 64 * KIB)) & set(_chunk_digests(b, 64 * KIB))
