"""Manifests: canonical encoding, strict decoding of hostile bytes, path safety on decode."""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.content import (
    ChunkRef,
    Cid,
    ContentTooLargeError,
    FileEntry,
    MalformedContentError,
    MalformedManifestError,
    MalformedSafetensorsError,
    Manifest,
    UnsafePathError,
    blake3_digest,
    decode_manifest,
    encode_manifest,
    manifest_cid,
    parse_safetensors,
    plan_chunks,
)
from tests.unit.content_samples import KIB, fuzz, safetensors_bytes

CHUNK = 4 * KIB


def _entry(path: str, data: bytes, *, mode: int = 0o644) -> FileEntry:
    index = parse_safetensors(data) if path.endswith(".safetensors") else None
    chunks = tuple(ChunkRef(blake3_digest(data[o : o + n]), o, n) for o, n in plan_chunks(len(data), CHUNK, index))
    return FileEntry(path, len(data), mode, hashlib.sha256(data).digest(), chunks, index)


MODEL = safetensors_bytes({"a": np.arange(3000, dtype=np.float32), "b": np.ones(10, np.int8)}, {"k": "v"})
GOOD = Manifest(
    version=1,
    name="tiny",
    tags=("a", "b"),
    chunk_bytes=CHUNK,
    files=(
        _entry("config.json", b"{}" * 3000),
        _entry("model.safetensors", MODEL),
        _entry("x/run.sh", b"#!", mode=0o755),
    ),
)
GOOD_BYTES = encode_manifest(GOOD)


def test_round_trip_and_id() -> None:
    assert decode_manifest(GOOD_BYTES) == GOOD
    cid = manifest_cid(GOOD)
    assert cid == Cid.for_manifest(GOOD_BYTES) and cid.is_manifest
    assert decode_manifest(GOOD_BYTES, expected=cid) == GOOD
    assert encode_manifest(msgspec.msgpack.decode(GOOD_BYTES, type=Manifest)) == GOOD_BYTES


def test_bytes_that_do_not_hash_to_the_expected_id_are_refused() -> None:
    with pytest.raises(MalformedManifestError, match="do not hash"):
        decode_manifest(GOOD_BYTES, expected=Cid.for_manifest(b"other"))


def test_non_canonical_encoding_is_refused() -> None:
    # Same values, map keys in another order: a second spelling would be a second id.
    as_dict = msgspec.msgpack.decode(GOOD_BYTES)
    reordered = msgspec.msgpack.encode(dict(reversed(list(as_dict.items()))))
    assert reordered != GOOD_BYTES
    with pytest.raises(MalformedManifestError, match="canonical"):
        decode_manifest(reordered)


def _with(**changes: object) -> bytes:
    return encode_manifest(msgspec.structs.replace(GOOD, **changes))


def _file_with(index: int, **changes: object) -> bytes:
    files = list(GOOD.files)
    files[index] = msgspec.structs.replace(files[index], **changes)
    return _with(files=tuple(files))


@pytest.mark.parametrize(
    ("data", "error", "reason"),
    [
        (_with(version=2), MalformedManifestError, "version 2"),
        (_with(tags=("b", "a")), MalformedManifestError, "sorted"),
        (_with(tags=("a", "a")), MalformedManifestError, "sorted"),
        (_with(tags=("",)), MalformedManifestError, "tag"),
        (_with(name="\x1b[2J"), MalformedManifestError, "control"),
        (_with(chunk_bytes=1), MalformedManifestError, "chunk size"),
        (_with(files=(GOOD.files[1], GOOD.files[0])), MalformedManifestError, "sorted by path"),
        (_file_with(0, path="../../etc/passwd"), UnsafePathError, r"'\.\.'"),
        (_file_with(0, path="/etc/passwd"), UnsafePathError, "absolute"),
        (_file_with(0, path="MODEL.safetensors"), UnsafePathError, "case"),
        (_file_with(0, path="model.safetensors"), UnsafePathError, "duplicate"),
        (_file_with(0, path="model.safetensors/x"), UnsafePathError, "also a directory"),
        (_file_with(0, mode=0o4755), MalformedManifestError, "mode"),
        (_file_with(0, size=-1), MalformedManifestError, "size"),
        (_file_with(0, size=GOOD.files[0].size + 1), MalformedManifestError, "chunk"),
        (_file_with(0, chunks=GOOD.files[0].chunks[:-1]), MalformedManifestError, "chunk"),
        (_file_with(0, chunks=GOOD.files[0].chunks[::-1]), MalformedManifestError, "chunk"),
        (_file_with(0, safetensors=GOOD.files[1].safetensors), MalformedManifestError, "tensor index"),
        (_file_with(1, size=GOOD.files[1].size + 8), MalformedSafetensorsError, "not indexed"),
        (b"\x91" * 100_000, MalformedManifestError, "nested too deeply|not a valid manifest"),
        (b"", MalformedManifestError, "not a valid manifest"),
        (GOOD_BYTES + b"\x00", MalformedManifestError, "not a valid manifest"),
    ],
)
def test_invalid_manifests_are_refused(data: bytes, error: type[Exception], reason: str) -> None:
    with pytest.raises(error, match=reason):
        decode_manifest(data)


def test_tampered_tensor_index_is_refused() -> None:
    index = GOOD.files[1].safetensors
    assert index is not None
    first = index.tensors[0]
    lying = msgspec.structs.replace(index, tensors=(msgspec.structs.replace(first, shape=(1,)), *index.tensors[1:]))
    with pytest.raises(MalformedSafetensorsError, match="do not match"):
        decode_manifest(_file_with(1, safetensors=lying))


def test_caps_are_enforced_before_work() -> None:
    with pytest.raises(ContentTooLargeError):
        decode_manifest(GOOD_BYTES, max_manifest_bytes=len(GOOD_BYTES) - 1)
    with pytest.raises(ContentTooLargeError):
        decode_manifest(GOOD_BYTES, max_files=2)
    with pytest.raises(ContentTooLargeError):
        decode_manifest(GOOD_BYTES, max_chunks=3)


@settings(fuzz, max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(GOOD_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_manifests_give_a_typed_error_or_a_valid_manifest(edits: list[tuple[int, int]]) -> None:
    data = bytearray(GOOD_BYTES)
    for position, byte in edits:
        data[position] = byte
    try:
        manifest = decode_manifest(bytes(data))
    except MalformedContentError:
        return
    assert encode_manifest(manifest) == bytes(data)


@fuzz
@given(st.binary(max_size=200))
def test_random_bytes_give_a_typed_error(data: bytes) -> None:
    with pytest.raises(MalformedContentError):
        decode_manifest(data)


_digests = st.binary(min_size=32, max_size=32)
_chunks = st.lists(st.builds(ChunkRef, _digests, st.integers(-2, 10 * CHUNK), st.integers(-2, 2 * CHUNK)), max_size=4)
_files = st.builds(
    FileEntry,
    path=st.one_of(st.sampled_from(["a", "b/c", "model.safetensors", "A", "../x", "a/b"]), st.text(max_size=12)),
    size=st.integers(-1, 4 * CHUNK),
    mode=st.sampled_from([0o644, 0o755, 0o777]),
    sha256=_digests,
    chunks=_chunks.map(tuple),
    safetensors=st.one_of(st.none(), st.just(GOOD.files[1].safetensors)),
)


@settings(fuzz, max_examples=300)
@given(
    st.builds(
        Manifest,
        version=st.sampled_from([1, 1, 2]),
        name=st.text(max_size=10),
        tags=st.lists(st.text(max_size=5), max_size=3).map(tuple),
        chunk_bytes=st.sampled_from([CHUNK, CHUNK, 1]),
        files=st.one_of(st.lists(_files, max_size=4).map(tuple), st.just(GOOD.files)),
    )
)
def test_structurally_random_manifests_give_a_typed_error_or_round_trip(manifest: Manifest) -> None:
    data = encode_manifest(manifest)
    try:
        decoded = decode_manifest(data)
    except MalformedContentError:
        return
    assert decoded == manifest and encode_manifest(decoded) == data
