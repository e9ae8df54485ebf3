"""256-bit ids, XOR distance and bucket indices."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.dht.keys import (
    bucket_index,
    common_prefix_bits,
    int_to_key,
    key_to_int,
    provider_key,
    record_key,
    xor_distance,
)
from lattica.errors import LocalProtocolError
from lattica.identity import Identity

keys = st.binary(min_size=32, max_size=32)


@given(keys, keys, keys)
def test_xor_distance_is_a_metric(a: bytes, b: bytes, c: bytes) -> None:
    assert xor_distance(a, a) == 0
    assert xor_distance(a, b) == xor_distance(b, a)
    assert xor_distance(a, c) <= xor_distance(a, b) + xor_distance(b, c)
    assert (xor_distance(a, b) == 0) == (a == b)


def test_distance_examples() -> None:
    zero = bytes(32)
    assert xor_distance(zero, int_to_key(1)) == 1
    assert xor_distance(zero, b"\x80" + bytes(31)) == 1 << 255
    assert bucket_index(zero, b"\x80" + bytes(31)) == 255
    assert bucket_index(zero, int_to_key(1)) == 0
    assert bucket_index(zero, int_to_key(3)) == 1
    assert common_prefix_bits(zero, int_to_key(1)) == 255
    with pytest.raises(LocalProtocolError):
        bucket_index(zero, zero)
    with pytest.raises(LocalProtocolError):
        key_to_int(bytes(20))  # a 160-bit id is not ours


@given(keys, keys)
def test_bucket_index_matches_distance_range(a: bytes, b: bytes) -> None:
    if a == b:
        return
    i = bucket_index(a, b)
    assert 2**i <= xor_distance(a, b) < 2 ** (i + 1)
    assert common_prefix_bits(a, b) == 255 - i


def test_namespaced_keys() -> None:
    writer = Identity.from_seed(bytes([1]) * 32).peer_id
    other = Identity.from_seed(bytes([2]) * 32).peer_id
    assert record_key(writer, b"k") == hashlib.sha256(b"lattica/record/" + writer.key + b"k").digest()
    assert record_key(writer, b"k") != record_key(other, b"k")
    assert provider_key(b"k") != record_key(writer, b"k")
    assert writer.dht_key() == hashlib.sha256(writer.key).digest()
