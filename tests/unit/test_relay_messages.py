"""Relay wire formats: control frames, circuit frames and relayed dial strings. Every decoder
gives a valid value or a typed error, never anything else."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.errors import RemoteProtocolError
from lattica.identity import Identity
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_messages import (
    MAX_CIRCUIT_DATAGRAM_BYTES,
    MAX_RELAY_FRAME_BYTES,
    CircuitDecoder,
    CircuitFrameError,
    CircuitLimits,
    Connect,
    Connected,
    HopMessage,
    Refused,
    Reserve,
    Reserved,
    StopAccepted,
    StopConnect,
    StopMessage,
    check_control_frame_length,
    encode_circuit_frames,
    refused,
)
from lattica.net.address import InvalidAddressError
from lattica.wire import decode_frame, encode_frame
from lattica.wire.frames import WIRE_VERSION

RELAY = Identity.from_seed(hashlib.sha256(b"relay").digest()).peer_id
TARGET = Identity.from_seed(hashlib.sha256(b"target").digest()).peer_id
LIMITS = CircuitLimits(duration_s=600.0, max_bytes=1 << 26)


@pytest.mark.parametrize(
    "message",
    [Reserve(), Connect(TARGET.key), Reserved(3600.0, LIMITS), Connected(LIMITS), refused("no-reservation", "x" * 999)],
)
def test_hop_messages_round_trip_within_the_frame_limit(message: object) -> None:
    frame = encode_frame(message, max_frame_bytes=MAX_RELAY_FRAME_BYTES)
    assert decode_frame(frame, HopMessage, max_frame_bytes=MAX_RELAY_FRAME_BYTES) == message  # type: ignore[arg-type]


@pytest.mark.parametrize("message", [StopConnect(RELAY.key, LIMITS), StopAccepted(), Refused("permission-denied")])
def test_stop_messages_round_trip(message: object) -> None:
    frame = encode_frame(message, max_frame_bytes=MAX_RELAY_FRAME_BYTES)
    assert decode_frame(frame, StopMessage, max_frame_bytes=MAX_RELAY_FRAME_BYTES) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        {"type": "connect", "target": b"short"},
        {"type": "refused", "code": "no-such-code"},
        {"type": "reserved", "ttl_s": -1.0, "limits": {"duration_s": 1.0, "max_bytes": 1}},
        {"type": "reserve", "extra": 1},
        {"type": "stop-connect", "source": bytes(32), "limits": {"duration_s": 1.0, "max_bytes": 1}},
    ],
)
def test_invalid_hop_frames_are_typed_errors(body: object) -> None:
    encoded = msgspec.msgpack.encode(body)
    raw = struct.pack(">IB", len(encoded) + 1, WIRE_VERSION) + encoded
    with pytest.raises(RemoteProtocolError):
        decode_frame(raw, HopMessage, max_frame_bytes=MAX_RELAY_FRAME_BYTES)  # type: ignore[arg-type]


def test_control_frame_length_is_checked_before_the_body() -> None:
    check_control_frame_length(MAX_RELAY_FRAME_BYTES)
    with pytest.raises(RemoteProtocolError):
        check_control_frame_length(MAX_RELAY_FRAME_BYTES + 1)
    with pytest.raises(RemoteProtocolError):
        check_control_frame_length(0)


@given(st.binary(max_size=2048))
def test_any_bytes_decode_to_a_hop_message_or_a_typed_error(data: bytes) -> None:
    for message_type in (HopMessage, StopMessage):
        try:
            message = decode_frame(data, message_type, max_frame_bytes=MAX_RELAY_FRAME_BYTES)  # type: ignore[arg-type]
        except RemoteProtocolError:
            continue
        assert isinstance(message, (Reserve, Connect, Reserved, Connected, Refused, StopConnect, StopAccepted))


@given(st.lists(st.binary(min_size=1, max_size=MAX_CIRCUIT_DATAGRAM_BYTES), max_size=20), st.data())
def test_circuit_frames_survive_any_split(datagrams: list[bytes], data: st.DataObject) -> None:
    stream = encode_circuit_frames(datagrams)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = CircuitDecoder()
    out: list[bytes] = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[previous:cut])
        previous = cut
    assert out == datagrams
    assert decoder.buffered_bytes == 0


@given(st.binary(max_size=8192))
def test_any_circuit_bytes_give_datagrams_or_a_typed_error_and_bounded_buffering(data: bytes) -> None:
    decoder = CircuitDecoder()
    try:
        datagrams = decoder.feed(data)
    except CircuitFrameError:
        return
    assert all(1 <= len(d) <= MAX_CIRCUIT_DATAGRAM_BYTES for d in datagrams)
    assert decoder.buffered_bytes < 2 + MAX_CIRCUIT_DATAGRAM_BYTES


def test_circuit_frames_refuse_empty_and_oversize_datagrams() -> None:
    with pytest.raises(CircuitFrameError):
        CircuitDecoder().feed(b"\x00\x00")
    with pytest.raises(CircuitFrameError):
        CircuitDecoder().feed(struct.pack(">H", MAX_CIRCUIT_DATAGRAM_BYTES + 1))
    with pytest.raises(ValueError):
        encode_circuit_frames([b""])
    with pytest.raises(ValueError):
        encode_circuit_frames([bytes(MAX_CIRCUIT_DATAGRAM_BYTES + 1)])


def test_relayed_dial_strings_parse_strictly_and_round_trip() -> None:
    text = f"{RELAY}@198.51.100.1:4001/relay/{TARGET}"
    parsed = RelayedAddr.parse(text)
    assert parsed.relay.peer_id == RELAY and parsed.relay.address == ("198.51.100.1", 4001)
    assert parsed.target == TARGET
    assert str(parsed) == text
    assert RelayedAddr.parse(f"{RELAY}@[2001:db8::1]:4001/relay/{TARGET}").relay.address == ("2001:db8::1", 4001)
    assert RelayedAddr.looks_relayed(text) and not RelayedAddr.looks_relayed(f"{RELAY}@198.51.100.1:4001")


@pytest.mark.parametrize(
    "text",
    [
        f"198.51.100.1:4001/relay/{TARGET}",  # the relay's id is required
        f"{RELAY}@198.51.100.1:4001/relay/",
        f"{RELAY}@198.51.100.1:4001/relay/{TARGET}/relay/{TARGET}",
        f"{RELAY}@198.51.100.1:4001/relay/{RELAY}",  # through itself
        f"{RELAY}@198.51.100.1:4001/relay/{str(TARGET).upper()}",
        f"{RELAY}@198.51.100.1:0/relay/{TARGET}",
        f"{RELAY}@198.51.100.1:4001",
        f"{RELAY}@198.51.100.1:4001/relais/{TARGET}",
    ],
)
def test_malformed_relayed_dial_strings_are_refused(text: str) -> None:
    with pytest.raises(InvalidAddressError):
        RelayedAddr.parse(text)


@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_with_invalid_address(text: str) -> None:
    with contextlib.suppress(InvalidAddressError):
        RelayedAddr.parse(text)
