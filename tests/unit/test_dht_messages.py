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
from lattica.dht.records import (
    MAX_ADDRESSES_PER_PEER,
    decode_provider_record,
    decode_record,
    sign_provider_record,
    sign_record,
    validate_provider_record,
)
from lattica.dht.store import StoredPeer
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
        INFO, addresses=[("198.51.100.1", p) for p in range(1, MAX_ADDRESSES_PER_PEER + 2)]
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


BAD_ADDRESSES = [
    ("a\x00b", 4001),  # crashed sendto with TypeError (issue 8 A1)
    ("example.com", 4001),  # would go through the system resolver
    ("fe80::1%eth0\x00", 4001),  # ipaddress accepts any zone id
    ("198.51.100.7", 0),
    ("", 4001),
]


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=repr)
def test_an_address_that_is_not_an_ip_literal_and_port_makes_the_message_malformed(address: tuple[str, int]) -> None:
    with pytest.raises(MalformedMessageError):
        decode_request(with_bad_address(Ping(sender=INFO), address, "sender"))
    with pytest.raises(MalformedMessageError):
        decode_response(with_bad_address(Nodes(sender=INFO, closer=[INFO, INFO]), address, "closer", 1))
    provider = sign_provider_record(ME, b"cid", [("198.51.100.1", 4001)], expires_at=2_000_000_000)
    with pytest.raises(MalformedMessageError):
        providers = Providers(sender=INFO, providers=[provider, provider])
        decode_response(with_bad_address(providers, address, "providers", 1))
    with pytest.raises(MalformedMessageError):
        decode_request(with_bad_address(AddProvider(sender=INFO, record=provider), address, "record"))
    forged = msgspec.structs.replace(provider, addresses=[address])  # records have no __post_init__
    with pytest.raises(InvalidRecordError):
        validate_provider_record(forged, now=1_900_000_000, max_ttl_s=10**9)


def with_bad_address(message: object, address: tuple[str, int], field: str, index: int | None = None) -> bytes:
    """``message`` encoded with the addresses of one of its peers or records replaced, as a
    hostile encoder would send it (our own structs refuse to hold such an address)."""
    raw = msgspec.msgpack.decode(encode_message(message))  # type: ignore[arg-type]
    entry = raw[field] if index is None else raw[field][index]
    entry["addresses"] = [list(address)]
    return msgspec.msgpack.encode(raw)


def test_peer_info_of_keeps_only_dialable_addresses() -> None:
    info = PeerInfo.of(ME.peer_id, [("localhost", 1), ("198.51.100.1", 4001), ("a\x00b", 2)])
    assert info.addresses == [("198.51.100.1", 4001)]


async def test_a_ping_carrying_a_bad_address_is_refused_and_nothing_is_remembered() -> None:
    net = MemoryNetwork()
    transport = net.transport(ME.peer_id, [("198.51.100.1", 4001)])
    dht = Dht(
        ME,
        transport,
        DhtStore(":memory:", own_key=ME.peer_id.dht_key()),
        remember_addresses=transport.add_addresses,
        own_addresses=lambda: [("198.51.100.1", 4001)],
        rng=random.Random(0),
    )
    handler = transport.handlers["/lattica/kad/1.0.0"]
    other = Identity.from_seed(bytes([2]) * 32).peer_id
    ping = Ping(sender=PeerInfo.of(other, [("198.51.100.2", 4001)]))
    reply = decode_response(await handler(other, with_bad_address(ping, ("a\x00b", 4001), "sender")))
    assert isinstance(reply, Error) and reply.code == "malformed"
    assert other not in dht.routing_table and transport.address_book.get(other, []) == []


async def test_a_saved_routing_table_with_bad_addresses_loads_without_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = Identity.from_seed(bytes([2]) * 32).peer_id
    evil = Identity.from_seed(bytes([3]) * 32).peer_id
    store = DhtStore(tmp_path / "db", own_key=ME.peer_id.dht_key())
    await store.save_peers(
        [
            StoredPeer(good, [("198.51.100.2", 4001)], 1.0),
            StoredPeer(evil, [("a\x00b", 4001)], 2.0),
        ]
    )
    net = MemoryNetwork()
    transport = net.transport(ME.peer_id, [("198.51.100.1", 4001)])
    dht = Dht(
        ME,
        transport,
        store,
        remember_addresses=transport.add_addresses,
        own_addresses=lambda: [("198.51.100.1", 4001)],
        rng=random.Random(0),
    )
    assert good in dht.routing_table and evil not in dht.routing_table
    assert transport.address_book.get(evil, []) == []
    await dht.persist_routing_table()
    assert [p.peer_id for p in store.load_peers()] == [good]
    store.close()


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
