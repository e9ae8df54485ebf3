"""Content ids: CIDv1 + BLAKE3 multihash, base32 text; strict parsing, interop with py-cid."""

from __future__ import annotations

import base64

import pytest
from cid import make_cid
from hypothesis import given
from hypothesis import strategies as st

from lattica.content import MANIFEST_CODEC, RAW_CODEC, Cid, InvalidCidError
from tests.unit.content_samples import fuzz

# BLAKE3 of the empty input (the reference test vector).
EMPTY_BLAKE3 = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")


def test_chunk_cid_is_raw_blake3_cidv1_in_base32() -> None:
    cid = Cid.for_chunk(b"")
    assert cid.digest == EMPTY_BLAKE3
    assert cid.to_bytes() == bytes([0x01, 0x55, 0x1E, 0x20]) + EMPTY_BLAKE3
    text = str(cid)
    assert text.startswith("bafkr4i")  # IPFS's prefix for a raw BLAKE3 block
    assert Cid.parse(text) == cid


def test_an_independent_parser_reads_our_chunk_ids() -> None:
    # py-cid knows the public codec table only, so it reads chunk ids (raw), not manifest ids.
    cid = Cid.for_chunk(b"hello")
    other = make_cid(str(cid))
    assert other.version == 1
    assert other.codec == "raw"
    assert other.buffer == cid.to_bytes()
    assert bytes(other.multihash) == bytes([0x1E, 0x20]) + cid.digest


def test_manifest_ids_use_the_private_codec() -> None:
    cid = Cid.for_manifest(b"x")
    assert cid.codec == MANIFEST_CODEC and cid.is_manifest
    assert cid.to_bytes()[:5] == bytes([0x01, 0x81, 0x80, 0xC0, 0x01])  # varint(0x300001)
    assert Cid.parse(str(cid)) == cid
    assert not Cid.for_chunk(b"x").is_manifest


def _text(raw: bytes) -> str:
    return "b" + base64.b32encode(raw).decode().rstrip("=").lower()


GOOD = bytes([0x01, 0x55, 0x1E, 0x20]) + EMPTY_BLAKE3


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "start with 'b'"),
        ("z" + _text(GOOD)[1:], "start with 'b'"),
        (_text(GOOD).upper(), "start with 'b'"),
        ("b" + _text(GOOD)[1:].upper(), "lowercase"),
        (_text(GOOD) + "=", "lowercase base32 without padding"),
        ("b" + "1" * 20, "not valid base32"),
        (_text(bytes([0x00]) + GOOD[1:]), "version 0"),
        (_text(bytes([0x02]) + GOOD[1:]), "version 2"),
        (_text(bytes([0x01, 0x70, 0x1E, 0x20]) + EMPTY_BLAKE3), "unknown content codec"),
        (_text(bytes([0x01, 0x55, 0x12, 0x20]) + EMPTY_BLAKE3), "unsupported multihash"),
        (_text(bytes([0x01, 0x55, 0x1E, 0x10]) + EMPTY_BLAKE3[:16]), "digest length"),
        (_text(GOOD + b"\x00"), "digest bytes"),
        (_text(GOOD[:-1]), "digest bytes"),
        (_text(bytes([0x01, 0xD5, 0x00, 0x1E, 0x20]) + EMPTY_BLAKE3), "non-minimal varint"),
        (_text(bytes([0x01]) + b"\xff" * 10), "longer than 9 bytes"),
        ("b" + "a" * 200, "longer than"),
    ],
)
def test_parse_refuses_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidCidError, match=reason):
        Cid.parse(text)


def test_non_canonical_trailing_bits_are_refused() -> None:
    text = str(Cid.for_chunk(b"abc"))
    # 36 bytes = 288 bits -> 58 base32 chars carrying 290 bits: the last char has 2 spare bits.
    last = "abcdefghijklmnopqrstuvwxyz234567".index(text[-1])
    tweaked = text[:-1] + "abcdefghijklmnopqrstuvwxyz234567"[last | 1]
    assert tweaked != text
    with pytest.raises(InvalidCidError, match="canonical"):
        Cid.parse(tweaked)


def test_constructor_refuses_unknown_codec_and_short_digest() -> None:
    with pytest.raises(InvalidCidError):
        Cid(0x70, EMPTY_BLAKE3)
    with pytest.raises(InvalidCidError):
        Cid(RAW_CODEC, b"short")


@fuzz
@given(st.text(max_size=80))
def test_parse_gives_a_typed_error_or_the_same_spelling(text: str) -> None:
    try:
        cid = Cid.parse(text)
    except InvalidCidError:
        return
    assert str(cid) == text


@fuzz
@given(st.binary(max_size=64))
def test_from_bytes_gives_a_typed_error_or_the_same_bytes(data: bytes) -> None:
    try:
        cid = Cid.from_bytes(data)
    except InvalidCidError:
        return
    assert cid.to_bytes() == data


@fuzz
@given(st.binary(min_size=4, max_size=40), st.integers(0, 35), st.integers(0, 255))
def test_mutated_ids_parse_to_a_typed_error_or_a_valid_id(payload: bytes, index: int, byte: int) -> None:
    raw = bytearray(Cid.for_chunk(payload).to_bytes())
    raw[index] = byte
    try:
        cid = Cid.parse(_text(bytes(raw)))
    except InvalidCidError:
        return
    assert cid.to_bytes() == bytes(raw)
