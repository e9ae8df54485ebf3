"""The STUN Binding codec (RFC 8489): round trips, RFC 5769 vectors, and hostile input."""

from __future__ import annotations

import contextlib
import ipaddress
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.errors import RemoteProtocolError
from lattica.nat.stun import (
    ATTR_XOR_MAPPED_ADDRESS,
    BINDING_METHOD,
    MAGIC_COOKIE,
    MAX_ATTRIBUTES,
    MAX_MESSAGE_BYTES,
    MalformedStunError,
    NotStunError,
    StunClass,
    StunDecodeError,
    StunMessage,
    StunMessageTooLargeError,
    decode_message,
    encode_binding_request,
    encode_binding_success,
    encode_message,
    encode_xor_mapped_address,
    error_code,
    new_transaction_id,
    unknown_comprehension_required,
    xor_mapped_address,
)

# RFC 5769 sections 2.2 and 2.3: transaction id and XOR-MAPPED-ADDRESS values of the sample responses.
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
TID = bytes(range(12))


def test_binding_request_is_twenty_bytes_with_cookie_and_request_type() -> None:
    data = encode_binding_request(TID)
    assert data == struct.pack("!HHI", 0x0001, 0, MAGIC_COOKIE) + TID
    assert decode_message(data) == StunMessage(BINDING_METHOD, StunClass.REQUEST, TID)


def test_binding_success_type_is_0x0101() -> None:
    data = encode_binding_success(TID, ("192.0.2.1", 32853))
    assert data[:2] == b"\x01\x01"
    assert len(data) == 32
    assert len(encode_binding_success(TID, ("2001:db8::1", 1))) == 44


def test_rfc5769_xor_mapped_address_ipv4_vector() -> None:
    value = encode_xor_mapped_address(("192.0.2.1", 32853), RFC5769_TID)
    assert value == bytes.fromhex("0001a147e112a643")


def test_rfc5769_xor_mapped_address_ipv6_vector() -> None:
    value = encode_xor_mapped_address(("2001:db8:1234:5678:11:2233:4455:6677", 32853), RFC5769_TID)
    assert value == bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::7", "::ffff:198.51.100.3"])
def test_success_response_round_trips_the_mapped_address(host: str) -> None:
    message = decode_message(encode_binding_success(TID, (host, 40000)))
    assert message.message_class == StunClass.SUCCESS and message.method == BINDING_METHOD
    expected = "198.51.100.3" if host.startswith("::ffff:") else host
    assert xor_mapped_address(message) == (expected, 40000)


def test_transaction_id_comes_from_the_injected_source() -> None:
    assert new_transaction_id(random.Random(7).randbytes) == random.Random(7).randbytes(12)
    with pytest.raises(ValueError):
        new_transaction_id(lambda n: b"short")


def test_every_class_and_method_round_trips_through_the_type_field() -> None:
    for method in (0x001, 0x0FF, 0xABC, 0xFFF):
        for message_class in StunClass:
            message = StunMessage(method, message_class, TID, ((0x8022, b"abc"), (0x0020, b"")))
            assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", NotStunError),
        (encode_binding_request(TID)[:19], NotStunError),
        (b"\x40" + encode_binding_request(TID)[1:], NotStunError),  # QUIC fixed bit
        (encode_binding_request(TID)[:4] + b"\x00\x00\x00\x00" + TID, NotStunError),  # no cookie
        (encode_binding_request(TID) + b"\x00\x00", MalformedStunError),  # length not a multiple of 4
        (encode_binding_request(TID) + b"\x00" * 4, MalformedStunError),  # length field says 0
        (b"\x00\x01\x00\x08" + encode_binding_request(TID)[4:] + b"\x00\x20\x00\x08abcd", MalformedStunError),
        (b"\x00\x01\x00\x08" + encode_binding_request(TID)[4:] + b"\x00\x20\x00\x05abcd", MalformedStunError),
    ],
)
def test_malformed_input_raises_a_typed_error(data: bytes, error: type[StunDecodeError]) -> None:
    with pytest.raises(error):
        decode_message(data)


def test_size_and_attribute_count_are_bounded() -> None:
    many = StunMessage(BINDING_METHOD, StunClass.REQUEST, TID, ((0x8022, b""),) * (MAX_ATTRIBUTES + 1))
    with pytest.raises(StunMessageTooLargeError):
        decode_message(encode_message(many))
    exactly = StunMessage(BINDING_METHOD, StunClass.REQUEST, TID, ((0x8022, b""),) * MAX_ATTRIBUTES)
    assert decode_message(encode_message(exactly)) == exactly
    big = StunMessage(BINDING_METHOD, StunClass.REQUEST, TID, ((0x8022, bytes(MAX_MESSAGE_BYTES)),))
    with pytest.raises(StunMessageTooLargeError):
        decode_message(encode_message(big))


def test_bad_xor_mapped_address_values_are_typed_errors() -> None:
    for value in (b"", b"\x00\x01\x00", b"\x00\x01\x00\x01abc", b"\x00\x03\x00\x01abcd", b"\x00\x02\x00\x01abcd"):
        message = StunMessage(BINDING_METHOD, StunClass.SUCCESS, TID, ((ATTR_XOR_MAPPED_ADDRESS, value),))
        with pytest.raises(MalformedStunError):
            xor_mapped_address(message)


def test_unknown_comprehension_required_attributes_are_reported() -> None:
    message = StunMessage(BINDING_METHOD, StunClass.REQUEST, TID, ((0x8022, b"sw"), (0x0020, b""), (0x0024, b"")))
    assert unknown_comprehension_required(message) == [0x0024]


def test_error_code_reads_class_and_number() -> None:
    message = StunMessage(BINDING_METHOD, StunClass.ERROR, TID, ((0x0009, b"\x00\x00\x04\x14Unknown"),))
    assert error_code(message) == 420
    with pytest.raises(MalformedStunError):
        error_code(StunMessage(BINDING_METHOD, StunClass.ERROR, TID, ((0x0009, b"\x04"),)))


def _check_typed_or_valid(data: bytes) -> None:
    try:
        message = decode_message(data)
    except StunDecodeError as exc:
        assert isinstance(exc, RemoteProtocolError)
        return
    # Padding bytes may hold anything (RFC 8489 section 14) and are not kept; all else is.
    reencoded = encode_message(message)
    assert len(reencoded) == len(data) and decode_message(reencoded) == message
    for reader in (xor_mapped_address, error_code):
        with contextlib.suppress(MalformedStunError):
            reader(message)


@given(st.binary(max_size=700))
def test_arbitrary_bytes_give_a_typed_error_or_a_valid_message(data: bytes) -> None:
    _check_typed_or_valid(data)


_attribute = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40))


@given(
    st.integers(0, 0xFFF),
    st.sampled_from(list(StunClass)),
    st.binary(min_size=12, max_size=12),
    st.lists(_attribute, max_size=MAX_ATTRIBUTES),
    st.data(),
)
def test_messages_round_trip_and_their_mutations_stay_typed(
    method: int,
    message_class: StunClass,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]],
    data: st.DataObject,
) -> None:
    message = StunMessage(method, message_class, transaction_id, tuple(attributes))
    wire = encode_message(message)
    if len(wire) <= MAX_MESSAGE_BYTES:
        assert decode_message(wire) == message
    position = data.draw(st.integers(0, len(wire) - 1))
    mutated = bytearray(wire)
    mutated[position] ^= data.draw(st.integers(1, 255))
    _check_typed_or_valid(bytes(mutated[: data.draw(st.integers(0, len(wire)))]))
    _check_typed_or_valid(bytes(mutated))


@given(st.ip_addresses(), st.integers(0, 0xFFFF), st.binary(min_size=12, max_size=12))
def test_any_mapped_address_round_trips(ip: object, port: int, transaction_id: bytes) -> None:
    host = str(ip)
    decoded = xor_mapped_address(decode_message(encode_binding_success(transaction_id, (host, port))))
    assert decoded is not None
    original = ipaddress.ip_address(host)
    if isinstance(original, ipaddress.IPv6Address) and original.ipv4_mapped is not None:
        original = original.ipv4_mapped
    assert decoded == (str(original), port)
