"""Safetensors header parser: valid files give the index; hostile headers a typed error."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.content import MalformedSafetensorsError, SafetensorsIndex, check_index, parse_safetensors
from lattica.content.safetensors_header import TensorInfo, read_safetensors_index
from tests.unit.content_samples import fuzz, raw_safetensors, safetensors_bytes, tensors


def test_index_of_a_reference_file() -> None:
    arrays = {"b": np.arange(5, dtype=np.int64), "a": np.zeros((3, 4), np.float32), "e": np.zeros((0, 2), np.float16)}
    data = safetensors_bytes(arrays, metadata={"format": "np"})
    index = parse_safetensors(data)
    (length,) = struct.unpack("<Q", data[:8])
    assert index.header_bytes == 8 + length
    assert index.metadata == {"format": "np"}
    by_name = {t.name: t for t in index.tensors}
    assert set(by_name) == {"a", "b", "e"}
    for name, array in arrays.items():
        tensor = by_name[name]
        assert tensor.shape == array.shape
        assert data[tensor.begin : tensor.end] == array.tobytes()
    assert by_name["a"].dtype == "F32" and by_name["b"].dtype == "I64" and by_name["e"].nbytes == 0
    assert [t.begin for t in index.tensors] == sorted(t.begin for t in index.tensors)
    assert index.data_bytes == len(data) - index.header_bytes


def test_reads_only_the_header_from_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = safetensors_bytes(tensors(1, {"w": (64, 64)}))
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert read_safetensors_index(str(path)) == parse_safetensors(data)


def test_header_padding_with_spaces_is_accepted() -> None:
    header = json.dumps({"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode() + b"   "
    assert parse_safetensors(raw_safetensors(header, b"xy")).tensors[0].name == "t"


def _one(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


HOSTILE = [
    ("huge length", raw_safetensors({}, length=1 << 60), "exceeds the cap"),
    ("length past end", raw_safetensors({"a": _one()}, b"\0" * 8, length=500), "past the end of the file"),
    ("shorter than 8", b"\x01\x00", "shorter than its 8-byte"),
    ("not utf-8", raw_safetensors(b'{"\xff\xfe":1}'), "not valid UTF-8"),
    ("not json", raw_safetensors(b"{nope}"), "not valid JSON"),
    ("not an object", raw_safetensors(b"[1, 2]"), "does not start with"),
    ("json array after brace", raw_safetensors(b"{} []"), "not valid JSON"),
    ("NaN", raw_safetensors(b'{"a": NaN}'), "NaN"),
    ("deep nesting", raw_safetensors(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
    ("duplicate names", raw_safetensors(b'{"a":' + json.dumps(_one()).encode() * 1 + b', "a":1}'), "duplicate key"),
    ("overlap", raw_safetensors({"a": _one(), "b": _one(offsets=[4, 12])}, b"\0" * 12), "overlaps"),
    ("gap", raw_safetensors({"a": _one(), "b": _one(offsets=[12, 20])}, b"\0" * 20), "gap of 4 bytes"),
    ("past the end", raw_safetensors({"a": _one()}, b"\0" * 4), "past the end of the file"),
    ("unindexed tail", raw_safetensors({"a": _one()}, b"\0" * 9), "not indexed"),
    ("size mismatch", raw_safetensors({"a": _one(shape=[3])}, b"\0" * 8), "do not match"),
    ("unknown dtype", raw_safetensors({"a": _one(dtype="F128")}, b"\0" * 8), "unknown dtype"),
    ("negative dim", raw_safetensors({"a": _one(shape=[-2])}, b"\0" * 8), "non-negative"),
    ("bool dim", raw_safetensors({"a": _one(shape=[True, 2])}, b"\0" * 8), "non-negative"),
    ("float offsets", raw_safetensors({"a": _one(offsets=[0.0, 8.0])}, b"\0" * 8), "data_offsets"),
    ("reversed offsets", raw_safetensors({"a": _one(offsets=[8, 0])}, b"\0" * 8), "data_offsets"),
    ("extra key", raw_safetensors({"a": {**_one(), "x": 1}}, b"\0" * 8), "exactly dtype"),
    ("lone surrogate name", raw_safetensors(b'{"\\ud800":' + json.dumps(_one()).encode() + b"}", b"\0" * 8), "UTF-8"),
    ("empty name", raw_safetensors({"": _one()}, b"\0" * 8), "empty name"),
    ("metadata not strings", raw_safetensors({"__metadata__": {"a": 1}}), "__metadata__"),
    ("rank too high", raw_safetensors({"a": _one(shape=[1] * 65, offsets=[0, 4])}, b"\0" * 4), "at most 64"),
    ("sub-byte leftover", raw_safetensors({"a": _one(dtype="F4", shape=[3], offsets=[0, 2])}, b"\0" * 2), "match"),
    ("huge int", raw_safetensors(b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b"]}}"), "JSON"),
]


@pytest.mark.parametrize(("data", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_headers_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedSafetensorsError, match=reason):
        parse_safetensors(data)


def test_header_length_cap_is_configurable() -> None:
    data = safetensors_bytes(tensors(2, {"w": (4,)}))
    with pytest.raises(MalformedSafetensorsError, match="exceeds the cap"):
        parse_safetensors(data, max_header_bytes=16)


def _assert_valid(index: SafetensorsIndex, size: int) -> None:
    position = index.header_bytes
    for tensor in index.tensors:
        assert tensor.begin == position
        position = tensor.end
    assert position == size


@fuzz
@given(st.binary(max_size=300))
def test_random_bytes_give_a_typed_error_or_a_valid_index(data: bytes) -> None:
    try:
        index = parse_safetensors(data)
    except MalformedSafetensorsError:
        return
    _assert_valid(index, len(data))


_VALID = safetensors_bytes({"a": np.arange(6, dtype=np.int16), "b": np.ones((2, 2), np.float32)}, {"k": "v"})


@fuzz
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_files_give_a_typed_error_or_a_valid_index(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_VALID)
    for position, byte in edits:
        data[position] = byte
    try:
        index = parse_safetensors(bytes(data))
    except MalformedSafetensorsError:
        return
    _assert_valid(index, len(data))


@fuzz
@given(st.integers(0, len(_VALID)))
def test_truncated_files_are_refused(cut: int) -> None:
    with pytest.raises(MalformedSafetensorsError):
        parse_safetensors(_VALID[:cut] if cut < len(_VALID) else _VALID + b"\0")


def test_check_index_refuses_what_the_parser_refuses() -> None:
    good = parse_safetensors(_VALID)
    assert check_index(good, file_size=len(_VALID)) is good
    first, second = good.tensors
    bad = [
        SafetensorsIndex(good.header_bytes, (second, first), good.metadata),  # not in offset order
        SafetensorsIndex(good.header_bytes, (first, first), good.metadata),  # duplicate
        SafetensorsIndex(good.header_bytes, (first,), good.metadata),  # tail not indexed
        SafetensorsIndex(good.header_bytes, (TensorInfo("a", "F64", (6,), first.begin, first.end), second), None),
        SafetensorsIndex(2, good.tensors, None),  # header size out of range
    ]
    for index in bad:
        with pytest.raises(MalformedSafetensorsError):
            check_index(index, file_size=len(_VALID))
