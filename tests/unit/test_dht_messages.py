"""DHT wire messages: round trips, bounds, and hostile bytes at the request handler."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.dht import Dht, DhtConfig, DhtStore
from lattica.dht.errors import InvalidRecordError
from lattica.dht.messages import (
    MAX_CLOSER_PEERS,
    MAX_MESSAGE_BYTES,
    Ack,
    AddProvider,
    Error,
    FindNode,
    GetProviders,
    GetValue,
    Nodes,
    PeerInfo,
    Ping,
    Pong,
    Providers,
    PutValue,
    Value,
    decode_request,
    decode_response,
    encode_message,
)
from lattica.dht.records import MAX_ADDRESSES_PER_PEER, decode_provider_record, decode_record, sign_record
from lattica.dht.testing import MemoryNetwork
from lattica.errors import FrameTooLargeError, MalformedMessageError, RemoteProtocolError
from lattica.identity import Identity

ME = Identity.from_seed(bytes([1]) * 32)
INFO = PeerInfo.of(ME.peer_id, [("198.51.100.1", 4001)])


def test_round_trips() -> None:
    record = sign_record(ME, b"k", b"v", seq=1, expires_at=2_000_000_000)
    for message in (
        Ping(sender=INFO),
        FindNode(sender=INFO, client=True, target=bytes(32)),
    ):
        assert decode_request(encode_message(message)) == message
    for reply in (
        Pong(sender=INFO),
        Nodes(sender=INFO, closer=[INFO]),
        Value(sender=INFO, record=record),
        Error(sender=INFO, code="malformed"),
    ):
        assert decode_response(encode_message(reply)) == reply


def test_requests_are_not_responses() -> None:
    with pytest.raises(MalformedMessageError):
        decode_response(encode_message(Ping(sender=INFO)))
    with pytest.raises(MalformedMessageError):
        decode_request(encode_message(Pong(sender=INFO)))


def test_bounds_are_enforced() -> None:
    too_many = Nodes(sender=INFO, closer=[INFO] * (MAX_CLOSER_PEERS + 1))
    with pytest.raises(MalformedMessageError):
        decode_response(encode_message(too_many))
    many_addresses = msgspec.structs.replace(
        INFO, addresses=[("198.51.100.1", p) for p in range(MAX_ADDRESSES_PER_PEER + 1)]
    )
    with pytest.raises(MalformedMessageError):
        decode_request(encode_message(Ping(sender=many_addresses)))
    with pytest.raises(MalformedMessageError):
        decode_request(encode_message(FindNode(sender=INFO, target=bytes(20))))
    with pytest.raises(FrameTooLargeError):
        decode_request(b"\x00" * (MAX_MESSAGE_BYTES + 1))


REQUEST_TYPES = (Ping, FindNode, GetValue, PutValue, AddProvider, GetProviders)
RESPONSE_TYPES = (Pong, Nodes, Value, Providers, Ack, Error)


def assert_valid_message(message: Any, types: tuple[type, ...], decode: Callable[[bytes], Any]) -> None:
    """A decoded message is one of ``types``, its peer ids and keys are 32 bytes, its lists are
    within their bounds, and it is a fixed point of encode/decode (so every Meta bound holds)."""
    assert type(message) in types
    infos = [message.sender, *(message.closer if isinstance(message, Nodes | Value | Providers) else [])]
    for info in infos:
        assert len(info.peer_id) == 32
        assert len(info.addresses) <= MAX_ADDRESSES_PER_PEER
    if isinstance(message, FindNode):
        assert len(message.target) == 32
    if isinstance(message, GetValue | GetProviders):
        assert len(message.key) == 32
    if isinstance(message, Nodes | Value | Providers):
        assert len(message.closer) <= MAX_CLOSER_PEERS
    assert decode(encode_message(message)) == message


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_to_typed_error_or_message(data: bytes) -> None:
    for decode, types in ((decode_request, REQUEST_TYPES), (decode_response, RESPONSE_TYPES)):
        try:
            message = decode(data)
        except RemoteProtocolError:
            continue
        assert_valid_message(message, types, decode)


_VALID_REQUEST = encode_message(FindNode(sender=INFO, target=bytes(32)))


@settings(max_examples=500)
@given(st.data())
def test_mutated_requests_decode_to_typed_error_or_message(data: st.DataObject) -> None:
    buf = bytearray(_VALID_REQUEST)
    for _ in range(data.draw(st.integers(1, 3))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        message = decode_request(bytes(buf))
    except RemoteProtocolError:
        return
    assert_valid_message(message, REQUEST_TYPES, decode_request)


async def test_handler_answers_garbage_and_impostors_with_errors() -> None:
    net = MemoryNetwork()
    transport = net.transport(ME.peer_id, [("198.51.100.1", 4001)])
    dht = Dht(
        ME,
        transport,
        DhtStore(":memory:", own_key=ME.peer_id.dht_key()),
        remember_addresses=transport.add_addresses,
        own_addresses=lambda: [("198.51.100.1", 4001)],
        config=DhtConfig(),
        rng=random.Random(0),
    )
    handler = transport.handlers["/lattica/kad/1.0.0"]
    other = Identity.from_seed(bytes([2]) * 32).peer_id
    reply = decode_response(await handler(other, b"\xc1garbage"))
    assert isinstance(reply, Error) and reply.code == "malformed"
    # The sender claims to be someone other than the authenticated connection peer.
    reply = decode_response(await handler(other, encode_message(Ping(sender=INFO))))
    assert isinstance(reply, Error) and reply.code == "bad-sender"
    assert len(dht.routing_table) == 0
    await trio.lowlevel.checkpoint()


def _request_with_nested_unknown_field(depth: int) -> bytes:
    """A valid FindNode request map plus an unknown field nested ``depth`` lists deep."""
    fields = msgspec.msgpack.decode(_VALID_REQUEST)
    assert isinstance(fields, dict) and len(fields) < 15
    body = b"".join(msgspec.msgpack.encode(k) + msgspec.msgpack.encode(v) for k, v in fields.items())
    return bytes([0x80 | (len(fields) + 1)]) + body + msgspec.msgpack.encode("zz") + b"\x91" * depth + b"\xc0"


def test_a_request_nested_5000_levels_deep_is_malformed() -> None:
    assert decode_request(_request_with_nested_unknown_field(3)) == decode_request(_VALID_REQUEST)
    with pytest.raises(MalformedMessageError):
        decode_request(_request_with_nested_unknown_field(5000))
    with pytest.raises(MalformedMessageError):
        decode_response(_request_with_nested_unknown_field(5000))


async def test_handler_answers_a_too_deep_request_with_malformed() -> None:
    net = MemoryNetwork()
    transport = net.transport(ME.peer_id, [("198.51.100.1", 4001)])
    Dht(
        ME,
        transport,
        DhtStore(":memory:", own_key=ME.peer_id.dht_key()),
        remember_addresses=transport.add_addresses,
        own_addresses=lambda: [("198.51.100.1", 4001)],
        config=DhtConfig(),
        rng=random.Random(0),
    )
    handler = transport.handlers["/lattica/kad/1.0.0"]
    reply = decode_response(await handler(ME.peer_id, _request_with_nested_unknown_field(5000)))
    assert isinstance(reply, Error) and reply.code == "malformed"


def test_a_stored_record_nested_5000_levels_deep_is_invalid() -> None:
    deep = b"\x81" + msgspec.msgpack.encode("zz") + b"\x91" * 5000 + b"\xc0"
    for decode in (decode_record, decode_provider_record):
        with pytest.raises(InvalidRecordError):
            decode(deep)
