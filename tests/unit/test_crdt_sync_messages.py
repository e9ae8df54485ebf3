"""The ``/lattica/crdt/1`` codec: bounded, typed errors on anything malformed."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.crdt import EnvelopeKind, make_genesis, sign_envelope
from lattica.crdt.errors import MalformedEnvelopeError
from lattica.crdt.sync import (
    MAX_VECTOR_ENTRIES,
    Push,
    PushReply,
    SyncReply,
    SyncRequest,
    decode_reply,
    decode_request,
    encode_message,
    vector_from_wire,
    vector_to_wire,
)
from lattica.identity import Identity

OWNER = Identity.from_seed(hashlib.sha256(b"owner").digest())
SPACE = make_genesis(OWNER, "s", bytes(16)).space_id
ENVELOPE = sign_envelope(OWNER, SPACE, 1, EnvelopeKind.UPDATE, b"\x00\x00")


def test_messages_round_trip() -> None:
    request = SyncRequest(SPACE.key, [(OWNER.peer_id.key, 3)], want_genesis=True)
    assert decode_request(encode_message(request)) == request
    push = Push(SPACE.key, [ENVELOPE])
    assert decode_request(encode_message(push)) == push
    reply = SyncReply([(OWNER.peer_id.key, 1)], [ENVELOPE], more=True, replicas=[OWNER.peer_id.key])
    assert decode_reply(encode_message(reply)) == reply
    assert decode_reply(encode_message(PushReply(1, ["replayed"]))) == PushReply(1, ["replayed"])


def test_a_reply_is_not_a_request() -> None:
    with pytest.raises(MalformedEnvelopeError):
        decode_request(encode_message(PushReply(0)))


def test_vectors_are_bounded() -> None:
    entries = [(i.to_bytes(32, "big"), 1) for i in range(MAX_VECTOR_ENTRIES + 1)]
    with pytest.raises(MalformedEnvelopeError):
        decode_request(msgspec.msgpack.encode({"type": "sync", "space": SPACE.key, "version_vector": entries}))


def test_vector_wire_form() -> None:
    a, b = bytes(32), b"\x01" * 32
    assert vector_to_wire({b: 2, a: 5}) == [(a, 5), (b, 2)]
    assert vector_from_wire([(a, 5), (a, 7), (b, 1)]) == {a: 7, b: 1}


def test_deep_nesting_is_a_typed_error() -> None:
    with pytest.raises(MalformedEnvelopeError):
        decode_request(b"\x91" * 100_000)


@given(st.binary(max_size=300))
def test_decode_request_gives_a_typed_error_or_a_message(data: bytes) -> None:
    try:
        message = decode_request(data)
    except MalformedEnvelopeError:
        return
    assert isinstance(message, SyncRequest | Push)


@given(st.binary(max_size=300))
def test_decode_reply_gives_a_typed_error_or_a_message(data: bytes) -> None:
    try:
        message = decode_reply(data)
    except MalformedEnvelopeError:
        return
    assert isinstance(message, SyncReply | PushReply)
