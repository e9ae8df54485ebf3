"""Specification of lattica.wire.frames: length-prefixed, versioned msgpack frames (sans-I/O)."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.errors import (
    FrameTooLargeError,
    LocalProtocolError,
    MalformedMessageError,
    RemoteProtocolError,
    TruncatedFrameError,
    UnsupportedVersionError,
)
from lattica.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    WIRE_VERSION,
    FrameDecoder,
    decode_frame,
    encode_frame,
    encode_frame_with_payload,
)

deterministic = settings(derandomize=True, max_examples=200, deadline=None, database=None)


class Hello(msgspec.Struct, frozen=True):
    peer: str
    port: int
    protocols: list[str] = []


class Ping(msgspec.Struct, frozen=True, tag="ping"):
    nonce: int


class Pong(msgspec.Struct, frozen=True, tag="pong"):
    nonce: int
    payload: bytes


Message = Ping | Pong


def header(length: int, version: int = WIRE_VERSION) -> bytes:
    """A frame header announcing ``length`` bytes (version byte included) after the u32."""
    return struct.pack(">IB", length, version)


def raw_frame(body: bytes, version: int = WIRE_VERSION) -> bytes:
    return header(len(body) + 1, version) + body


def drain(decoder: FrameDecoder[Any]) -> list[Any]:
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(message)
    return messages


# --- Strategies -------------------------------------------------------------------------------

int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
pings = st.builds(Ping, nonce=int64)
pongs = st.builds(Pong, nonce=int64, payload=st.binary(max_size=64))
messages = st.one_of(pings, pongs)
hellos = st.builds(
    Hello,
    peer=st.text(max_size=40),
    port=st.integers(min_value=0, max_value=65535),
    protocols=st.lists(st.text(max_size=10), max_size=5),
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | int64
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.sampled_from(["ping", "pong", "type", "nonce", "payload"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "nonce", "payload", "x"]) | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- Round trips ------------------------------------------------------------------------------


def test_struct_message_round_trips() -> None:
    message = Hello(peer="abc", port=4001, protocols=["dht/1", "relay/1"])
    assert decode_frame(encode_frame(message), Hello) == message


def test_defaults_are_filled_in_on_decode() -> None:
    assert decode_frame(encode_frame({"peer": "p", "port": 1}), Hello) == Hello("p", 1, [])


def test_tagged_union_round_trips_to_the_right_variant() -> None:
    assert decode_frame(encode_frame(Ping(7)), Message) == Ping(7)  # type: ignore[arg-type]
    assert decode_frame(encode_frame(Pong(7, b"x")), Message) == Pong(7, b"x")  # type: ignore[arg-type]


def test_frame_layout_is_length_then_version_then_msgpack_body() -> None:
    frame = encode_frame(Ping(1))
    body = msgspec.msgpack.encode(Ping(1))
    assert frame == struct.pack(">I", len(body) + 1) + bytes([WIRE_VERSION]) + body
    assert HEADER_BYTES == 5


@deterministic
@given(st.lists(messages, max_size=8))
def test_any_sequence_of_union_messages_round_trips(sent: list[Ping | Pong]) -> None:
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    decoder.feed(b"".join(encode_frame(m) for m in sent))
    assert drain(decoder) == sent
    decoder.end_of_stream()


@deterministic
@given(hellos)
def test_any_struct_message_round_trips(message: Hello) -> None:
    assert decode_frame(encode_frame(message), Hello) == message


@deterministic
@given(st.data(), st.lists(messages, min_size=1, max_size=6))
def test_chunking_never_changes_the_decoded_messages(data: st.DataObject, sent: list[Any]) -> None:
    stream = b"".join(encode_frame(m) for m in sent)
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    received = []
    for chunk in data.draw(chunked(stream)):
        decoder.feed(chunk)
        received += drain(decoder)
    assert received == sent
    assert decoder.buffered_bytes == 0
    decoder.end_of_stream()


@deterministic
@given(st.data(), st.lists(messages, min_size=1, max_size=6))
def test_feeds_of_bytes_and_bytearrays_mixed_give_the_same_messages(data: st.DataObject, sent: list[Any]) -> None:
    # Whole frames of a bytes feed are decoded in place, a frame split across feeds is
    # completed in the buffer, and bytearray feeds are copied: any mix gives the same stream.
    stream = b"".join(encode_frame(m) for m in sent)
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    received = []
    for chunk in data.draw(chunked(stream)):
        decoder.feed(bytearray(chunk) if data.draw(st.booleans()) else chunk)  # type: ignore[arg-type]
        if data.draw(st.booleans()):  # sometimes feed twice before taking messages
            received += drain(decoder)
    received += drain(decoder)
    assert received == sent
    assert decoder.buffered_bytes == 0
    decoder.end_of_stream()


def test_a_frame_split_across_feeds_copies_only_its_own_bytes() -> None:
    first, second, third = (encode_frame(Pong(n, bytes(1000 + n))) for n in range(3))
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    decoder.feed(first + second[:10])
    assert drain(decoder) == [Pong(0, bytes(1000))]
    decoder.feed(second[10:] + third)
    assert len(decoder._buffer) == len(second)  # the third frame stays in the fed bytes
    assert drain(decoder) == [Pong(1, bytes(1001)), Pong(2, bytes(1002))]


def test_an_oversize_header_split_across_feeds_is_refused_before_buffering() -> None:
    decoder = FrameDecoder(Ping, max_frame_bytes=1000)
    decoder.feed(encode_frame(Ping(1)) + header(5000)[:2])
    assert drain(decoder) == [Ping(1)]
    with pytest.raises(FrameTooLargeError):
        decoder.feed(header(5000)[2:] + bytes(100))


# --- Incremental feeding ----------------------------------------------------------------------


def test_byte_by_byte_feed_yields_the_message_only_at_its_last_byte() -> None:
    frame = encode_frame(Pong(42, b"payload"))
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    for byte in frame[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_message() is None
    decoder.feed(frame[-1:])
    assert decoder.next_message() == Pong(42, b"payload")
    assert decoder.next_message() is None


def test_byte_by_byte_feed_of_several_frames_yields_the_same_messages() -> None:
    sent = [Ping(1), Pong(2, b""), Ping(3), Pong(4, b"\x00" * 300)]
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    received = []
    for byte in b"".join(encode_frame(m) for m in sent):
        decoder.feed(bytes([byte]))
        received += drain(decoder)
    assert received == sent


def test_several_frames_in_one_feed_are_all_returned_in_order() -> None:
    sent = [Ping(1), Ping(2), Pong(3, b"c")]
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    decoder.feed(b"".join(encode_frame(m) for m in sent))
    assert decoder.next_message() == Ping(1)
    assert decoder.next_message() == Ping(2)
    assert decoder.next_message() == Pong(3, b"c")
    assert decoder.next_message() is None


def test_a_partial_second_frame_stays_buffered() -> None:
    second = encode_frame(Ping(2))
    decoder = FrameDecoder(Ping)
    decoder.feed(encode_frame(Ping(1)) + second[:3])
    assert drain(decoder) == [Ping(1)]
    assert decoder.buffered_bytes == 3
    decoder.feed(second[3:])
    assert drain(decoder) == [Ping(2)]
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("split", [False, True], ids=["whole-in-one-feed", "split-across-feeds"])
def test_a_bad_frame_is_consumed_and_the_next_one_decodes(split: bool) -> None:
    # Frames inside one feed are decoded in place, split ones from the buffer: both consume
    # a frame whose body is not a valid message.
    stream = raw_frame(b"\xc1") + encode_frame(Pong(7, b"after"))
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    decoder.feed(stream[:3] if split else stream)
    if split:
        assert decoder.next_message() is None
        decoder.feed(stream[3:])
    with pytest.raises(MalformedMessageError):
        decoder.next_message()
    assert decoder.next_message() == Pong(7, b"after")
    assert decoder.buffered_bytes == 0


def test_a_fed_bytearray_changed_afterwards_changes_nothing() -> None:
    received = bytearray(encode_frame(Pong(1, b"original")))
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message)  # type: ignore[arg-type]
    decoder.feed(received)  # type: ignore[arg-type]
    received[-8:] = b"changed!"
    received += b"grown"  # would raise BufferError if the decoder held a view of it
    assert decoder.next_message() == Pong(1, b"original")


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder(Ping)
    decoder.feed(b"")
    assert decoder.next_message() is None
    decoder.end_of_stream()


# --- Size limits ------------------------------------------------------------------------------


def test_oversize_announced_length_raises_before_the_body_arrives() -> None:
    decoder = FrameDecoder(Pong, max_frame_bytes=100)
    with pytest.raises(FrameTooLargeError):
        decoder.feed(header(101))


def test_oversize_announced_length_raises_when_fed_a_byte_at_a_time() -> None:
    decoder = FrameDecoder(Pong, max_frame_bytes=100)
    announced = header(2**32 - 1)
    for byte in announced[:-1]:
        decoder.feed(bytes([byte]))
    with pytest.raises(FrameTooLargeError):
        decoder.feed(announced[-1:])


def test_oversize_second_frame_is_refused_before_its_body_arrives() -> None:
    decoder = FrameDecoder(Ping, max_frame_bytes=100)
    decoder.feed(encode_frame(Ping(1)) + header(101))
    with pytest.raises(FrameTooLargeError):
        drain(decoder)


def test_a_frame_exactly_at_the_limit_is_accepted() -> None:
    message = Pong(1, b"x" * 50)
    frame = encode_frame(message)
    limit = len(frame) - 4  # the announced length: version byte plus body
    assert decode_frame(frame, Pong, max_frame_bytes=limit) == message
    with pytest.raises(FrameTooLargeError):
        decode_frame(frame, Pong, max_frame_bytes=limit - 1)


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 1 << 20
    decoder = FrameDecoder(Pong)
    assert decoder.max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    with pytest.raises(FrameTooLargeError):
        decoder.feed(header(DEFAULT_MAX_FRAME_BYTES + 1))


def test_frame_too_large_is_the_remote_peers_fault() -> None:
    assert issubclass(FrameTooLargeError, RemoteProtocolError)


def test_encoding_an_oversize_message_is_a_local_protocol_error() -> None:
    message = Pong(1, b"x" * 50)
    body_bytes = len(msgspec.msgpack.encode(message))
    encode_frame(message, max_frame_bytes=body_bytes + 1)
    with pytest.raises(LocalProtocolError):
        encode_frame(message, max_frame_bytes=body_bytes)


def test_encoding_beyond_the_default_limit_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(Pong(1, b"x" * DEFAULT_MAX_FRAME_BYTES))


# --- Malformed frames -------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_raises_unsupported_version(version: int) -> None:
    decoder = FrameDecoder(Ping)
    with pytest.raises(UnsupportedVersionError):
        decoder.feed(raw_frame(msgspec.msgpack.encode(Ping(1)), version=version))


def test_wrong_version_is_detected_from_the_header_alone() -> None:
    decoder = FrameDecoder(Ping)
    with pytest.raises(UnsupportedVersionError):
        decoder.feed(header(10, version=WIRE_VERSION + 1))


def test_zero_length_frame_is_malformed() -> None:
    decoder = FrameDecoder(Ping)
    with pytest.raises(MalformedMessageError):
        decoder.feed(struct.pack(">I", 0) + encode_frame(Ping(1)))


def test_version_byte_without_a_body_is_malformed() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(header(1), Ping)


def test_a_message_of_another_type_is_malformed() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(encode_frame(Hello("p", 1)), Ping)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"peer": "p"}, id="missing-field"),
        pytest.param({"peer": "p", "port": "4001"}, id="wrong-field-type"),
        pytest.param({"peer": 1, "port": 1}, id="wrong-field-type-2"),
        pytest.param({"peer": "p", "port": 1, "protocols": "dht"}, id="str-for-list"),
        pytest.param(["p", 1], id="array-for-map"),
        pytest.param(None, id="nil"),
        pytest.param(7, id="int"),
    ],
)
def test_a_message_of_the_wrong_shape_is_malformed(value: object) -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(encode_frame(value), Hello)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"type": "pang", "nonce": 1}, id="unknown-tag"),
        pytest.param({"nonce": 1}, id="missing-tag"),
        pytest.param({"type": "pong", "nonce": 1}, id="missing-variant-field"),
        pytest.param({"type": "ping", "nonce": 1.5}, id="float-for-int"),
        pytest.param({"type": "pong", "nonce": 1, "payload": "text"}, id="str-for-bytes"),
    ],
)
def test_a_union_message_of_the_wrong_shape_is_malformed(value: object) -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(encode_frame(value), Message)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x92\x01", id="truncated-array"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-header"),
        pytest.param(msgspec.msgpack.encode(Ping(1)) + b"\x00", id="trailing-value"),
    ],
)
def test_an_invalid_msgpack_body_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(body), Ping)


def test_malformed_message_error_is_the_remote_peers_fault() -> None:
    for error in (MalformedMessageError, UnsupportedVersionError, TruncatedFrameError):
        assert issubclass(error, RemoteProtocolError)


# --- End of stream ----------------------------------------------------------------------------


def test_end_of_stream_on_a_frame_boundary_is_clean() -> None:
    decoder = FrameDecoder(Ping)
    decoder.feed(encode_frame(Ping(1)))
    assert drain(decoder) == [Ping(1)]
    decoder.end_of_stream()


@pytest.mark.parametrize("kept", [1, 4, 5, 6])
def test_end_of_stream_inside_a_frame_is_truncated(kept: int) -> None:
    frame = encode_frame(Pong(1, b"abc"))
    assert kept < len(frame)
    decoder = FrameDecoder(Pong)
    decoder.feed(frame[:kept])
    assert decoder.next_message() is None
    with pytest.raises(TruncatedFrameError):
        decoder.end_of_stream()


def test_end_of_stream_after_an_unread_whole_frame_is_truncated() -> None:
    # Bytes not yet taken as a message are still "in" the stream; ending now loses them.
    decoder = FrameDecoder(Ping)
    decoder.feed(encode_frame(Ping(1)))
    with pytest.raises(TruncatedFrameError):
        decoder.end_of_stream()


# --- decode_frame -----------------------------------------------------------------------------


def test_decode_frame_rejects_trailing_bytes() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(encode_frame(Ping(1)) + b"\x00", Ping)


def test_decode_frame_rejects_a_second_frame() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(encode_frame(Ping(1)) + encode_frame(Ping(2)), Ping)


@pytest.mark.parametrize("kept", [0, 3, 5, -1])
def test_decode_frame_rejects_a_truncated_frame(kept: int) -> None:
    frame = encode_frame(Pong(1, b"abc"))
    with pytest.raises(TruncatedFrameError):
        decode_frame(frame[:kept], Pong)


# --- Hostile input: a typed error or a valid message, never anything else ---------------------


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Byte streams mixing valid frames, well-framed garbage bodies and raw garbage."""
    segment = st.one_of(
        messages.map(encode_frame),
        msgpack_values.map(lambda v: raw_frame(msgspec.msgpack.encode(v))),
        st.binary(max_size=40).map(raw_frame),
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=40)).map(
            lambda t: header(t[0], t[1]) + t[2]
        ),
        st.binary(max_size=40),
    )
    return b"".join(draw(st.lists(segment, max_size=6)))


@deterministic
@given(st.data(), st.one_of(hostile_streams(), st.binary(max_size=300)))
def test_decoder_yields_valid_messages_or_a_remote_protocol_error(data: st.DataObject, stream: bytes) -> None:
    decoder: FrameDecoder[Ping | Pong] = FrameDecoder(Message, max_frame_bytes=200)  # type: ignore[arg-type]
    try:
        for chunk in data.draw(chunked(stream)):
            decoder.feed(chunk)
            for message in drain(decoder):
                assert type(message) in (Ping, Pong)
                assert isinstance(message.nonce, int)
                if isinstance(message, Pong):
                    assert isinstance(message.payload, bytes)
                assert decode_frame(encode_frame(message), Message) == message  # type: ignore[arg-type]
        decoder.end_of_stream()
    except RemoteProtocolError:
        pass


@deterministic
@given(st.one_of(hellos.map(encode_frame), hostile_streams(), st.binary(max_size=300)))
def test_decode_frame_returns_a_valid_message_or_a_remote_protocol_error(stream: bytes) -> None:
    try:
        message = decode_frame(stream, Hello, max_frame_bytes=200)
    except RemoteProtocolError:
        return
    assert type(message) is Hello
    assert isinstance(message.peer, str)
    assert isinstance(message.port, int)
    assert all(isinstance(p, str) for p in message.protocols)
    assert decode_frame(encode_frame(message), Hello) == message


# --- Nesting depth (issue 8 A3) ---------------------------------------------------------------


def hello_with_nested_unknown_field(depth: int) -> bytes:
    """A valid ``Hello`` body plus an unknown field holding a list nested ``depth`` levels."""
    nested = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    known = b"".join(msgspec.msgpack.encode(v) for v in ("peer", "p", "port", 1))
    return b"\x83" + known + msgspec.msgpack.encode("x") + nested


def test_an_unknown_field_nested_5000_levels_is_malformed_not_a_recursion_error() -> None:
    with pytest.raises(MalformedMessageError, match="nested too deeply"):
        decode_frame(raw_frame(hello_with_nested_unknown_field(5000)), Hello)


def test_the_decoder_goes_on_after_a_too_deep_frame() -> None:
    decoder = FrameDecoder(Hello)
    decoder.feed(raw_frame(hello_with_nested_unknown_field(5000)) + encode_frame(Hello("q", 2)))
    with pytest.raises(MalformedMessageError):
        decoder.next_message()
    assert decoder.next_message() == Hello("q", 2)


@deterministic
@given(st.integers(min_value=0, max_value=6000))
def test_any_nesting_depth_gives_the_message_or_malformed(depth: int) -> None:
    try:
        message = decode_frame(raw_frame(hello_with_nested_unknown_field(depth)), Hello)
    except MalformedMessageError:
        assert depth > 100  # shallow nesting is never refused
        return
    assert message == Hello("p", 1)


class Chunk(msgspec.Struct, frozen=True, array_like=True, tag="chunk"):
    id: int
    offset: int
    data: bytes


@deterministic
@given(
    id=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**40),
    size=st.sampled_from([0, 1, 255, 256, 65535, 65536, 65537, 262144]) | st.integers(0, 70000),
    seed=st.integers(0, 255),
)
def test_a_frame_built_around_a_payload_is_the_frame_msgspec_builds(id: int, offset: int, size: int, seed: int) -> None:
    payload = bytes((seed + i) % 251 for i in range(size))
    built = encode_frame_with_payload(Chunk(id, offset, b""), memoryview(b"xx" + payload)[2:])
    assert built == encode_frame(Chunk(id, offset, payload))
    assert decode_frame(built, Chunk) == Chunk(id, offset, payload)


def test_a_frame_around_a_payload_is_bounded_and_needs_an_empty_last_bytes_field() -> None:
    with pytest.raises(LocalProtocolError, match="frame limit"):
        encode_frame_with_payload(Chunk(1, 2, b""), b"x" * 1000, max_frame_bytes=1000)
    assert len(encode_frame_with_payload(Chunk(1, 2, b""), b"x" * 980, max_frame_bytes=1000)) <= 1004
    for not_empty in (Chunk(1, 2, b"x"), Ping(5)):
        with pytest.raises(LocalProtocolError, match="empty bytes field"):
            encode_frame_with_payload(not_empty, b"payload")
