"""Identify and AutoNAT decoders: a typed error or a valid value, never anything else."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.errors import FrameTooLargeError, MalformedMessageError, RemoteProtocolError
from lattica.nat.autonat_messages import (
    DIAL_BACK_PACKET_BYTES,
    DialBackPacket,
    DialBackRequest,
    DialBackResponse,
    decode_dial_back_packet,
    decode_dial_back_request,
    decode_dial_back_response,
    encode_autonat,
    encode_dial_back_packet,
    is_dial_back_packet,
)
from lattica.nat.identify import (
    MAX_IDENTIFY_BYTES,
    MAX_LISTEN_ADDRESSES,
    build_identify,
    decode_identify,
    encode_identify,
)
from lattica.nat.stun import StunDecodeError, decode_message

_pack = msgspec.msgpack.encode


def _identify(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "listen_addresses": [["198.51.100.1", 4001]],
        "protocols": ["/lattica/ping/1"],
        "agent_version": "lattica/test",
        "observed_address": ["203.0.113.1", 40000],
    }
    fields.update(overrides)
    return fields


def test_identify_round_trips_in_canonical_form() -> None:
    message = build_identify(
        listen_addresses=[("::ffff:198.51.100.1", 4001), ("not-an-ip", 1)],
        protocols=["/a/1", ""],
        agent_version="x" * 500,
        observed_address=("2001:DB8::1", 5),
    )
    decoded = decode_identify(encode_identify(message))
    assert decoded.listen_address_list() == [("198.51.100.1", 4001)]
    assert decoded.protocols == ["/a/1"]
    assert len(decoded.agent_version) == 128
    assert decoded.observed() == ("2001:db8::1", 5)


@pytest.mark.parametrize(
    "fields",
    [
        _identify(observed_address=["example.com", 1]),  # names never come from the network
        _identify(observed_address=["0.0.0.0", 1]),
        _identify(observed_address=["198.51.100.1", 0]),
        _identify(listen_addresses=[["198.51.100.1\x00", 1]]),
        _identify(listen_addresses=[["198.51.100.1", 1]] * (MAX_LISTEN_ADDRESSES + 1)),
        _identify(protocols=["p"] * 65),
        _identify(protocols=["p" * 257]),
        _identify(agent_version="v" * 129),
        _identify(listen_addresses=[[[[[]]]]]),
    ],
)
def test_identify_with_bad_fields_is_malformed(fields: dict[str, object]) -> None:
    with pytest.raises(MalformedMessageError):
        decode_identify(_pack(fields))


def test_oversize_and_deeply_nested_identify_are_typed_errors() -> None:
    with pytest.raises(FrameTooLargeError):
        decode_identify(b"\x90" * (MAX_IDENTIFY_BYTES + 1))
    with pytest.raises(MalformedMessageError):
        decode_identify(b"\x81\xa9protocols" + b"\x91" * 5000 + b"\x90")


@given(st.binary(max_size=512))
def test_identify_decoder_gives_a_typed_error_or_a_valid_message(data: bytes) -> None:
    try:
        message = decode_identify(data)
    except RemoteProtocolError:
        return
    message.listen_address_list()
    message.observed()


@given(
    st.fixed_dictionaries(
        {
            "listen_addresses": st.lists(st.tuples(st.text(max_size=50), st.integers(-5, 70000)), max_size=20),
            "protocols": st.lists(st.text(max_size=300), max_size=70),
            "agent_version": st.text(max_size=200),
            "observed_address": st.none()
            | st.tuples(st.sampled_from(["198.51.100.1", "::1", "x", "1.2.3"]), st.integers(-1, 70000)),
        }
    )
)
def test_identify_decoder_on_structured_input(fields: dict[str, object]) -> None:
    try:
        message = decode_identify(_pack(fields))
    except RemoteProtocolError:
        return
    assert len(message.listen_addresses) <= MAX_LISTEN_ADDRESSES
    assert all(1 <= port <= 65535 for _, port in message.listen_address_list())


@given(st.binary(max_size=300))
def test_autonat_decoders_give_a_typed_error_or_a_valid_message(data: bytes) -> None:
    try:
        request = decode_dial_back_request(data)
    except RemoteProtocolError:
        pass
    else:
        assert 1 <= len(request.address_list()) <= 4
    try:
        response = decode_dial_back_response(data)
    except RemoteProtocolError:
        pass
    else:
        assert response.status == "refused" or (response.address and response.nonce)


def test_autonat_messages_round_trip_and_reject_inconsistent_ones() -> None:
    request = DialBackRequest(addresses=[("203.0.113.1", 40000)])
    assert decode_dial_back_request(encode_autonat(request)).address_list() == [("203.0.113.1", 40000)]
    ok = DialBackResponse(status="ok", address=("203.0.113.1", 40000), nonce=bytes(16))
    assert decode_dial_back_response(encode_autonat(ok)) == ok
    for bad in (
        {"addresses": []},
        {"addresses": [["203.0.113.1", 1]] * 5},
        {"addresses": [["localhost", 1]]},
    ):
        with pytest.raises(MalformedMessageError):
            decode_dial_back_request(_pack(bad))
    for bad in (
        {"status": "ok"},  # a result without address and nonce
        {"status": "refused"},  # a refusal without its code
        {"status": "refused", "refusal": "because"},
        {"status": "ok", "address": ["203.0.113.1", 1], "nonce": bytes(15)},
    ):
        with pytest.raises(MalformedMessageError):
            decode_dial_back_response(_pack(bad))


@given(st.binary(max_size=64))
def test_dial_back_packet_decoder_gives_a_typed_error_or_a_valid_packet(data: bytes) -> None:
    try:
        packet = decode_dial_back_packet(data)
    except MalformedMessageError:
        return
    assert encode_dial_back_packet(packet) == data


@given(st.binary(min_size=16, max_size=16), st.sampled_from(["dial-back", "echo"]))
def test_dial_back_packets_are_never_quic_nor_stun(nonce: bytes, kind: str) -> None:
    data = encode_dial_back_packet(DialBackPacket(kind, nonce))  # type: ignore[arg-type]
    assert len(data) == DIAL_BACK_PACKET_BYTES and is_dial_back_packet(data)
    assert not data[0] & 0x40  # QUIC's fixed bit is clear
    with pytest.raises(StunDecodeError):
        decode_message(data)
