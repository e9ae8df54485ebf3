"""Envelopes, genesis and space ids: signing, verification, and decoders under hostile bytes."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.crdt import Envelope, EnvelopeKind, SpaceId, decode_envelope, encode_envelope, make_genesis, sign_envelope
from lattica.crdt.envelope import MAX_BODY_BYTES, verify_envelope
from lattica.crdt.errors import InvalidSpaceIdError, MalformedEnvelopeError
from lattica.crdt.space_id import decode_genesis, encode_genesis, verify_genesis
from lattica.errors import RemoteProtocolError
from lattica.identity import Identity

OWNER = Identity.from_seed(hashlib.sha256(b"owner").digest())
OTHER = Identity.from_seed(hashlib.sha256(b"other").digest())
NONCE = bytes(range(16))
GENESIS = make_genesis(OWNER, "catalog", NONCE)
SPACE = GENESIS.space_id


def test_space_id_is_the_hash_of_the_genesis_and_proves_the_owner() -> None:
    again = make_genesis(OWNER, "catalog", NONCE)
    assert again.space_id == SPACE
    assert make_genesis(OWNER, "catalog", bytes(16)).space_id != SPACE
    assert make_genesis(OTHER, "catalog", NONCE).space_id != SPACE
    verify_genesis(GENESIS, SPACE)
    # Someone else's key under the same name and nonce hashes elsewhere: the id names the owner.
    with pytest.raises(MalformedEnvelopeError):
        verify_genesis(make_genesis(OTHER, "catalog", NONCE), SPACE)


def test_a_genesis_signed_by_someone_else_is_refused() -> None:
    forged = msgspec.structs.replace(GENESIS, signature=OTHER.sign(GENESIS.preimage()))
    with pytest.raises(MalformedEnvelopeError):
        verify_genesis(forged)
    assert decode_genesis(encode_genesis(GENESIS)) == GENESIS


def test_space_id_text_round_trips_and_refuses_junk() -> None:
    text = str(SPACE)
    assert len(text) == 52 and text == text.lower()
    assert SpaceId.parse(text) == SPACE
    for bad in ["", text.upper(), text[:-1], text + "a", "0" * 52, text[:-1] + "b"]:
        with pytest.raises(InvalidSpaceIdError):
            SpaceId.parse(bad)


def test_sign_and_verify_round_trip() -> None:
    envelope = sign_envelope(OWNER, SPACE, 1, EnvelopeKind.UPDATE, b"\x00\x00")
    assert decode_envelope(encode_envelope(envelope)) == envelope
    assert envelope.author_id == OWNER.peer_id and envelope.space_id == SPACE


@pytest.mark.parametrize(
    "field, value",
    [
        ("space", bytes(32)),
        ("author", OTHER.peer_id.key),
        ("seq", 2),
        ("kind", int(EnvelopeKind.GRANT)),
        ("body", b"\x00\x01"),
        ("digest", hashlib.sha256(b"x").digest()),
        ("signature", bytes(64)),
        ("version", 2),
    ],
)
def test_any_changed_field_breaks_verification(field: str, value: object) -> None:
    envelope = sign_envelope(OWNER, SPACE, 1, EnvelopeKind.UPDATE, b"\x00\x00")
    tampered = msgspec.structs.replace(envelope, **{field: value})
    with pytest.raises(MalformedEnvelopeError):
        decode_envelope(encode_envelope(tampered))


def test_the_signature_is_domain_separated_from_the_genesis() -> None:
    # A signature made for some other purpose over the same fields must not verify.
    envelope = sign_envelope(OWNER, SPACE, 1, EnvelopeKind.UPDATE, b"")
    raw = msgspec.msgpack.encode((1, SPACE.key, OWNER.peer_id.key, 1, 0, envelope.digest))
    other_purpose = msgspec.structs.replace(envelope, signature=OWNER.sign(raw))
    with pytest.raises(MalformedEnvelopeError):
        verify_envelope(other_purpose)


def test_bodies_are_bounded() -> None:
    with pytest.raises(ValueError):
        sign_envelope(OWNER, SPACE, 1, EnvelopeKind.UPDATE, bytes(MAX_BODY_BYTES + 1))
    big = Envelope(1, SPACE.key, OWNER.peer_id.key, 1, 0, bytes(32), bytes(MAX_BODY_BYTES + 1), bytes(64))
    with pytest.raises(MalformedEnvelopeError):
        decode_envelope(msgspec.msgpack.encode(big))


def test_deep_nesting_is_a_typed_error() -> None:
    with pytest.raises(MalformedEnvelopeError):
        decode_envelope(b"\x91" * 100_000)


@given(st.binary(max_size=400))
def test_decode_envelope_gives_a_typed_error_or_a_verified_envelope(data: bytes) -> None:
    try:
        envelope = decode_envelope(data)
    except RemoteProtocolError:
        return
    verify_envelope(envelope)


@given(
    st.lists(
        st.one_of(
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.binary(max_size=70),
            st.text(max_size=10),
            st.none(),
            st.booleans(),
        ),
        max_size=9,
    )
)
def test_decode_envelope_on_wrong_shapes(fields: list[object]) -> None:
    try:
        decode_envelope(msgspec.msgpack.encode(fields))
    except MalformedEnvelopeError:
        return
    raise AssertionError("an unsigned envelope was accepted")


@given(st.binary(max_size=300))
def test_decode_genesis_gives_a_typed_error_or_a_verified_genesis(data: bytes) -> None:
    try:
        genesis = decode_genesis(data)
    except RemoteProtocolError:
        return
    verify_genesis(genesis)
