"""The relayed-address record (lattica.nat.relay_record): strict decoding of a network value."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.identity import Identity
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_record import (
    MAX_RELAYED_ADDRESSES,
    RelayRecordDecodeError,
    decode_relayed_addresses,
    encode_relayed_addresses,
)


def peer(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"record-%d" % i).digest())


WRITER = peer(1).peer_id
RELAY = peer(2).peer_id
GOOD = RelayedAddr.parse(f"{RELAY}@198.51.100.7:4001/relay/{WRITER}")


def test_round_trip_without_repeats() -> None:
    other = RelayedAddr.parse(f"{peer(3).peer_id}@[2001:db8::1]:4001/relay/{WRITER}")
    assert decode_relayed_addresses(encode_relayed_addresses([GOOD, other, GOOD]), WRITER) == [GOOD, other]


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([f"{RELAY}@relay.example:4001/relay/{WRITER}"], "relayed address"),  # a name: never resolved
        ([f"{RELAY}@198.51.100.7:4001/relay/{RELAY}"], "relayed address"),  # relays itself
        ([f"{RELAY}@198.51.100.7:4001/relay/{peer(4).peer_id}"], "another target"),
        ([f"198.51.100.7:4001/relay/{WRITER}"], "relayed address"),  # relay without its id
        ([str(GOOD)] * (MAX_RELAYED_ADDRESSES + 1), "bad relayed-address record"),
        (["x" * 300], "bad relayed-address record"),
        ({"not": "a list"}, "bad relayed-address record"),
    ],
)
def test_bad_records_are_typed_errors(entries: object, why: str) -> None:
    with pytest.raises(RelayRecordDecodeError, match=why):
        decode_relayed_addresses(msgspec.msgpack.encode(entries), WRITER)


def test_deep_nesting_and_oversize_values_are_typed_errors() -> None:
    with pytest.raises(RelayRecordDecodeError):
        decode_relayed_addresses(b"\x91" * 4000 + b"\x90", WRITER)
    with pytest.raises(RelayRecordDecodeError, match="limit"):
        decode_relayed_addresses(b"\x90" + b"\x00" * 5000, WRITER)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_addresses_of_the_writer_or_a_typed_error(data: bytes) -> None:
    try:
        addresses = decode_relayed_addresses(data, WRITER)
    except RelayRecordDecodeError:
        return
    assert all(a.target == WRITER for a in addresses)
