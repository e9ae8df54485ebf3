"""The sans-I/O yamux session: two sessions pumped in memory, and hostile frames fed by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.errors import LocalProtocolError, RemoteProtocolError
from lattica.net.yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER_BYTES,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    Event,
    FrameHeader,
    GoAwayReceived,
    PingAcknowledged,
    SendWindowGrew,
    StreamClosed,
    StreamOpened,
    StreamReset,
    YamuxSession,
    decode_header,
    encode_header,
)

WINDOW = 512 * 1024


def pair(**kwargs: int) -> tuple[YamuxSession, YamuxSession]:
    options = {"stream_window_bytes": WINDOW, **kwargs}
    return YamuxSession(is_client=True, **options), YamuxSession(is_client=False, **options)


def pump(sender: YamuxSession, receiver: YamuxSession) -> list[Event]:
    return receiver.receive_data(sender.data_to_send())


def frames(data: bytes) -> list[FrameHeader]:
    """Headers of a byte string of frames (payloads skipped)."""
    found = []
    position = 0
    while position < len(data):
        header = decode_header(data[position : position + HEADER_BYTES])
        found.append(header)
        position += HEADER_BYTES
        if header.type == TYPE_DATA:
            position += header.length
    return found


def received(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


# -- streams ----------------------------------------------------------------------------------


def test_a_stream_carries_data_both_ways_and_closes_after_both_fins() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    assert stream_id == 1
    client.send_data(stream_id, b"hello", end_stream=True)
    events = pump(client, server)
    assert events[0] == StreamOpened(1)
    assert DataReceived(1, b"hello", True) in events
    server.send_data(1, b"world", end_stream=True)
    assert not server.has_stream(1)  # FIN both ways: the slot is free
    back = pump(server, client)
    assert received(back) == b"world"
    assert StreamClosed(1) in back
    assert client.open_streams == 0
    assert server.open_streams == 0


def test_server_streams_are_even_and_client_streams_odd() -> None:
    client, server = pair()
    assert [client.open_stream(), client.open_stream()] == [1, 3]
    assert [server.open_stream(), server.open_stream()] == [2, 4]
    pump(client, server)
    assert [e for e in pump(server, client) if isinstance(e, StreamOpened)] == [
        StreamOpened(2),
        StreamOpened(4),
    ]


def test_payload_is_delivered_as_it_arrives_not_after_the_whole_frame() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    client.send_data(stream_id, b"a" * 1000)
    wire = client.data_to_send()
    first = server.receive_data(wire[: HEADER_BYTES * 2 + 10])
    assert received(first) == b"a" * 10
    assert received(server.receive_data(wire[HEADER_BYTES * 2 + 10 :])) == b"a" * 990


def test_sending_beyond_the_window_is_a_local_error_and_consuming_reopens_it() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    pump(client, server)
    pump(server, client)  # the ACK grants WINDOW
    assert client.send_window(stream_id) == WINDOW
    client.send_data(stream_id, b"x" * WINDOW)
    with pytest.raises(LocalProtocolError):
        client.send_data(stream_id, b"x")
    pump(client, server)
    server.stream_consumed(stream_id, WINDOW // 2 - 1)
    assert server.data_to_send() == b""  # not yet half the window
    server.stream_consumed(stream_id, 1)
    events = pump(server, client)
    assert events == [SendWindowGrew(stream_id)]
    assert client.send_window(stream_id) == WINDOW // 2


def test_opening_beyond_max_streams_is_a_local_error() -> None:
    client, _server = pair(max_streams=2)
    client.open_stream()
    client.open_stream()
    assert not client.can_open_stream
    with pytest.raises(LocalProtocolError):
        client.open_stream()


def test_a_reset_reaches_the_peer_and_frees_the_slot() -> None:
    client, server = pair(max_streams=1)
    stream_id = client.open_stream()
    pump(client, server)
    server.reset_stream(stream_id)
    assert pump(server, client)[-1] == StreamReset(stream_id)
    assert client.can_open_stream
    assert client.send_window(stream_id) == 0


def test_data_in_flight_after_our_reset_is_discarded_within_its_window() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    pump(client, server)
    client.send_data(stream_id, b"late" * 100)
    server.reset_stream(stream_id)  # crosses the data on the wire
    assert server.receive_data(client.data_to_send()) == []


def test_data_after_our_reset_beyond_the_window_it_had_is_a_protocol_error() -> None:
    client, server = pair()
    stream_id = client.open_stream()
    pump(client, server)
    server.reset_stream(stream_id)
    server.data_to_send()
    with pytest.raises(RemoteProtocolError):
        server.receive_data(encode_header(TYPE_DATA, 0, stream_id, WINDOW + 1))


def test_ping_is_answered_and_the_answer_is_reported() -> None:
    client, server = pair()
    opaque = client.ping()
    assert pump(client, server) == []
    assert pump(server, client) == [PingAcknowledged(opaque)]


def test_after_our_go_away_new_streams_are_refused_with_a_reset() -> None:
    client, server = pair()
    server.go_away()
    assert pump(server, client) == [GoAwayReceived(0)]
    assert not client.can_open_stream
    # A SYN that crossed the Go Away: reset, and its data discarded; the session goes on.
    wire = encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + encode_header(TYPE_DATA, 0, 1, 3)
    assert server.receive_data(wire + b"abc") == []
    assert [(f.type, f.flags, f.stream_id) for f in frames(server.data_to_send())] == [
        (TYPE_WINDOW_UPDATE, FLAG_RST, 1)
    ]
    assert not server.terminated


# -- hostile frames ---------------------------------------------------------------------------


def _syn(stream_id: int) -> bytes:
    return encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0)


def test_data_beyond_the_window_ends_the_session_with_a_go_away() -> None:
    server = YamuxSession(is_client=False, stream_window_bytes=WINDOW)
    wire = _syn(1) + encode_header(TYPE_DATA, 0, 1, WINDOW + 1)
    with pytest.raises(RemoteProtocolError, match="exceed its window"):
        server.receive_data(wire)
    assert server.terminated
    last = frames(server.data_to_send())[-1]
    assert (last.type, last.length) == (TYPE_GO_AWAY, GO_AWAY_PROTOCOL_ERROR)
    assert server.receive_data(b"anything") == []


def test_a_peer_opening_too_many_streams_is_a_protocol_error() -> None:
    server = YamuxSession(is_client=False, max_streams=3)
    server.receive_data(_syn(1) + _syn(3) + _syn(5))
    assert server.open_streams == 3
    with pytest.raises(RemoteProtocolError, match="more than 3"):
        server.receive_data(_syn(7))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (_syn(2), "our parity"),
        (_syn(3) + _syn(1), "not above"),
        (_syn(3) + _syn(3), "not above"),
        (encode_header(TYPE_DATA, 0, 9, 1) + b"x", "never opened"),
        (encode_header(TYPE_DATA, 0, 0, 0), "need a stream id"),
        (encode_header(TYPE_PING, FLAG_SYN, 1, 0), "stream 0"),
        (encode_header(TYPE_GO_AWAY, 0, 1, 0), "stream 0"),
        (_syn(1) + encode_header(TYPE_DATA, FLAG_FIN, 1, 0) + encode_header(TYPE_DATA, 0, 1, 1), "after FIN"),
        (_syn(1) + encode_header(TYPE_WINDOW_UPDATE, 0, 1, 0xFFFFFFFF), "overflows"),
        (_syn(1) + encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0), "ACK for stream"),
        (b"\x01" + bytes(11), "version"),
        (b"\x00\x07" + bytes(10), "type"),
        (b"\x00\x00\x00\x30" + bytes(8), "flags"),
    ],
)
def test_forbidden_frames_are_remote_protocol_errors(wire: bytes, message: str) -> None:
    server = YamuxSession(is_client=False)
    with pytest.raises(RemoteProtocolError, match=message):
        server.receive_data(wire)


def test_a_fin_only_frame_ends_the_peer_direction() -> None:
    server = YamuxSession(is_client=False)
    events = server.receive_data(_syn(1) + encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, 1, 0))
    assert events == [StreamOpened(1), DataReceived(1, b"", True)]


def test_decode_header_rejects_wrong_lengths_as_a_local_bug() -> None:
    with pytest.raises(ValueError):
        decode_header(b"\x00" * 11)


@given(st.binary(min_size=HEADER_BYTES, max_size=HEADER_BYTES))
def test_decode_header_gives_a_header_or_a_remote_protocol_error(data: bytes) -> None:
    try:
        header = decode_header(data)
    except RemoteProtocolError:
        return
    assert encode_header(header.type, header.flags, header.stream_id, header.length) == data


_frame = st.builds(
    lambda t, f, s, n, payload: encode_header(t, f, s, n) + payload,
    st.integers(0, 4),
    st.sampled_from([0, FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN | FLAG_FIN, 0x10]),
    st.integers(0, 8),
    st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)),
    st.binary(max_size=64),
)


@settings(max_examples=300)
@given(st.lists(st.one_of(_frame, st.binary(max_size=40)), max_size=12), st.booleans())
def test_any_input_gives_events_or_a_remote_protocol_error(chunks: list[bytes], is_client: bool) -> None:
    session = YamuxSession(is_client=is_client, max_streams=4)
    try:
        for chunk in chunks:
            for event in session.receive_data(chunk):
                assert isinstance(
                    event,
                    StreamOpened
                    | DataReceived
                    | StreamReset
                    | SendWindowGrew
                    | PingAcknowledged
                    | GoAwayReceived
                    | StreamClosed,
                )
    except RemoteProtocolError:
        assert session.terminated
    assert session.open_streams <= 4
