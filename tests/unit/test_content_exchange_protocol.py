"""The content exchange protocol's sans-I/O sides: requests, pieces, cancels, refusals, and
hostile bytes in both directions (a typed error or valid events, never anything else)."""

from __future__ import annotations

import tracemalloc

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.content.exchange_messages import (
    MAX_PIECE_BYTES,
    MIN_PIECE_BYTES,
    NOT_FOUND,
    PIECE_BYTES,
    Piece,
    Refused,
    Want,
)
from lattica.content.exchange_protocol import (
    BlockReceived,
    BlockRefused,
    BlockWanted,
    ExchangeClient,
    ExchangeServer,
    HasAnswered,
    HasAsked,
    RequestCancelled,
)
from lattica.errors import FrameTooLargeError, LocalProtocolError, RemoteProtocolError
from lattica.wire import encode_frame
from tests.unit.content_samples import fuzz, random_bytes

DIGEST = bytes(range(32))
OTHER = bytes(32)


def frame(message: object) -> bytes:
    return encode_frame(message, max_frame_bytes=1 << 21)


def on_wire(frames: list[tuple[bytes, memoryview]]) -> bytes:
    """Frames given as parts, as the stream carries them."""
    return b"".join(head + payload for head, payload in frames)


def test_a_block_crosses_in_pieces_and_arrives_whole() -> None:
    client, server = ExchangeClient(), ExchangeServer()
    data = random_bytes(2 * PIECE_BYTES + 17, seed=1)
    request_id, request = client.want(DIGEST, len(data))
    assert server.receive(request) == [BlockWanted(request_id, DIGEST, len(data))]
    frames = server.block_frames(request_id, 0, len(data), data)
    assert len(frames) == 3 and not server.is_wanted(request_id)
    events = [e for f in frames for e in client.receive(on_wire([f]))]
    assert events == [BlockReceived(request_id, DIGEST, memoryview(data))]
    assert client.outstanding == 0 and server.outstanding == 0


def test_a_lane_sends_a_whole_block_in_one_piece_taken_in_place() -> None:
    # piece_bytes up to MAX_PIECE_BYTES (what a lane's server uses); a client fed an owned view
    # takes the block as a view into that very frame: no copy between TLS and the disk.
    client, server = ExchangeClient(), ExchangeServer()
    data = random_bytes(MAX_PIECE_BYTES, seed=2)
    request_id, request = client.want(DIGEST, len(data))
    server.receive(request)
    frames = server.block_frames(request_id, 0, len(data), data, piece_bytes=MAX_PIECE_BYTES)
    assert len(frames) == 1
    _head, payload = frames[0]
    assert payload.obj is data  # the frame's payload is the block itself, not a copy
    wire = bytearray(on_wire(frames))
    [event] = client.receive(memoryview(wire).toreadonly(), owned=True)
    assert isinstance(event, BlockReceived) and event.data == data
    wire[-1] ^= 0xFF  # the event's data is that frame's memory
    assert event.data[-1] == data[-1] ^ 0xFF
    with pytest.raises(LocalProtocolError):
        server.block_frames(request_id, 0, 1, b"x", piece_bytes=MAX_PIECE_BYTES + 1)


def test_pipelined_requests_ranged_reads_has_and_refusal() -> None:
    client, server = ExchangeClient(), ExchangeServer()
    block = random_bytes(MIN_PIECE_BYTES + 10, seed=3)
    a, fa = client.want(DIGEST, len(block))
    b, fb = client.want(OTHER, 10)
    c, fc = client.has(OTHER)
    assert server.receive(fa + fb + fc) == [
        BlockWanted(a, DIGEST, len(block)),
        BlockWanted(b, OTHER, 10),
        HasAsked(c, OTHER),
    ]
    replies = server.refuse(b, NOT_FOUND) + server.has_reply(c, False)
    cut = MIN_PIECE_BYTES  # ranged reads: the first piece ends where the first read did
    replies += on_wire(server.block_frames(a, 0, len(block), block[:cut]))
    replies += on_wire(server.block_frames(a, cut, len(block), block[cut:]))
    assert client.receive(replies) == [
        BlockRefused(b, OTHER, NOT_FOUND),
        HasAnswered(c, OTHER, False),
        BlockReceived(a, DIGEST, memoryview(block)),
    ]


def test_cancel_stops_the_server_and_late_pieces_are_ignored() -> None:
    client, server = ExchangeClient(), ExchangeServer()
    request_id, request = client.want(DIGEST, 100)
    server.receive(request)
    late = server.block_frames(request_id, 0, 100, b"x" * 50)
    assert server.receive(client.cancel(request_id)) == [RequestCancelled(request_id)]
    assert server.block_frames(request_id, 50, 100, b"y" * 50) == []
    assert server.refuse(request_id, NOT_FOUND) == b""
    assert client.receive(on_wire(late)) == []
    assert client.cancel(request_id) == b""  # already forgotten: nothing to send


def test_server_bounds_requests_in_flight_and_wants_increasing_ids() -> None:
    server = ExchangeServer(max_outstanding=2)
    server.receive(frame(Want(0, DIGEST, 1)) + frame(Want(1, DIGEST, 1)))
    with pytest.raises(RemoteProtocolError, match="in flight"):
        server.receive(frame(Want(2, DIGEST, 1)))
    with pytest.raises(RemoteProtocolError, match="does not increase"):
        ExchangeServer().receive(frame(Want(5, DIGEST, 1)) + frame(Want(5, DIGEST, 1)))
    with pytest.raises(FrameTooLargeError):
        ExchangeServer().receive(b"\x00\x01\x00\x00\x01")


@pytest.mark.parametrize(
    ("piece", "error"),
    [
        (Piece(7, 0, 4, b"abcd"), "never made"),
        (Piece(0, 0, 200, b"abcd"), "at most 100"),
        (Piece(0, 2, 4, b"ab"), "does not continue"),
        (Piece(0, 0, 4, b"abcdef"), "runs past"),
        (Piece(0, 0, 4, b""), "empty piece"),  # review finding: endless empty pieces
    ],
)
def test_client_refuses_pieces_that_do_not_fit_what_it_asked(piece: Piece, error: str) -> None:
    client = ExchangeClient()
    client.want(DIGEST, 100)
    with pytest.raises(RemoteProtocolError, match=error):
        client.receive(frame(piece))


@pytest.mark.parametrize(
    "data",
    ["abcd", 4, [1, 2, 3, 4], {"a": 1}, msgspec.msgpack.Ext(1, b"abcd"), None],
    ids=["str", "int", "array", "map", "ext", "nil"],
)
def test_a_piece_whose_data_is_not_bytes_is_a_protocol_error(data: object) -> None:
    # The client takes a piece's data as the raw msgpack object in the frame (no copy):
    # anything but a bin is refused, not read as bytes.
    client = ExchangeClient()
    client.want(DIGEST, 100)
    with pytest.raises(RemoteProtocolError, match="not bytes"):
        client.receive(frame(["piece", 0, 0, 4, data]), owned=True)


def test_a_piece_above_the_piece_limit_is_a_protocol_error() -> None:
    client = ExchangeClient()
    client.want(DIGEST, 4 * MAX_PIECE_BYTES)
    too_big = frame(Piece(0, 0, 4 * MAX_PIECE_BYTES, bytes(MAX_PIECE_BYTES + 1)))
    with pytest.raises(RemoteProtocolError, match="at most"):
        client.receive(too_big)


def test_a_tiny_piece_inside_a_block_is_a_protocol_error() -> None:
    # Honest servers send full pieces; a byte at a time would cost a message per byte.
    client = ExchangeClient()
    client.want(DIGEST, 4 * MIN_PIECE_BYTES)
    with pytest.raises(RemoteProtocolError, match="at least"):
        client.receive(frame(Piece(0, 0, 4 * MIN_PIECE_BYTES, b"x" * (MIN_PIECE_BYTES - 1))))
    last = ExchangeClient()
    last.want(DIGEST, MIN_PIECE_BYTES + 1)
    last.receive(frame(Piece(0, 0, MIN_PIECE_BYTES + 1, bytes(MIN_PIECE_BYTES))))
    [event] = last.receive(frame(Piece(0, MIN_PIECE_BYTES, MIN_PIECE_BYTES + 1, b"z")))  # a block's end
    assert isinstance(event, BlockReceived) and len(event.data) == MIN_PIECE_BYTES + 1


def test_pieces_read_beside_other_frames_keep_nothing_else_alive() -> None:
    # Review finding: a piece kept as a view into a read it shared with large frames (fillers
    # for a cancelled request) kept the whole read alive: 1-byte pieces held 1.2 GiB. Pieces
    # of a block in progress hold their own bytes only.
    client = ExchangeClient()
    cancelled, _ = client.want(OTHER, 64 << 20)  # its late pieces stay within what it allowed
    client.cancel(cancelled)
    pieces = 32
    total = pieces * MIN_PIECE_BYTES + 1  # never completed: every piece stays pending
    client.want(DIGEST, total)
    filler = frame(Piece(cancelled, 0, 64 << 20, bytes(256 * 1024)))
    tracemalloc.start()
    try:
        for i in range(pieces):
            read = frame(Piece(1, i * MIN_PIECE_BYTES, total, bytes(MIN_PIECE_BYTES))) + filler
            assert client.receive(memoryview(read).toreadonly(), owned=True) == []
            del read
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * pieces * MIN_PIECE_BYTES  # 512 KiB of pieces, not 8.5 MiB of reads


def test_a_piece_after_the_end_of_a_split_frame_keeps_nothing_else_alive() -> None:
    # The same through a frame split across reads: each read is the rest of a large filler
    # (begun in the read before) and then one piece. The piece's frame is all that is left of
    # its read, yet a view of it would keep the whole read alive.
    client = ExchangeClient()
    cancelled, _ = client.want(OTHER, 64 << 20)  # its late pieces stay within what it allowed
    client.cancel(cancelled)
    pieces = 32
    total = pieces * MIN_PIECE_BYTES + 1
    client.want(DIGEST, total)
    filler = frame(Piece(cancelled, 0, 64 << 20, bytes(256 * 1024)))
    tracemalloc.start()
    try:
        for i in range(pieces):
            assert client.receive(filler[:10]) == []
            piece = frame(Piece(1, i * MIN_PIECE_BYTES, total, bytes(MIN_PIECE_BYTES)))
            read = filler[10:] + piece
            assert client.receive(memoryview(read).toreadonly(), owned=True) == []
            del read
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * pieces * MIN_PIECE_BYTES


def test_late_replies_are_accepted_only_for_cancelled_requests_and_only_what_they_allowed() -> None:
    # Review finding: pieces for requests long answered were ignored without end, so a seeder
    # could send junk forever, and its stream looked busy enough to keep its requests.
    client = ExchangeClient()
    answered, _ = client.want(DIGEST, 4)
    [done] = client.receive(frame(Piece(answered, 0, 4, b"abcd")))
    assert isinstance(done, BlockReceived)
    with pytest.raises(RemoteProtocolError, match="answered already"):
        client.receive(frame(Piece(answered, 0, 4, b"abcd")))
    client = ExchangeClient()
    cancelled, _ = client.want(DIGEST, 2 * MIN_PIECE_BYTES)
    client.cancel(cancelled)
    total = 2 * MIN_PIECE_BYTES
    assert client.receive(frame(Piece(cancelled, 0, total, bytes(MIN_PIECE_BYTES)))) == []
    with pytest.raises(RemoteProtocolError, match="more bytes for cancelled request"):
        client.receive(frame(Piece(cancelled, MIN_PIECE_BYTES, total, bytes(MIN_PIECE_BYTES + 1))))
    client = ExchangeClient()
    refused, _ = client.want(DIGEST, 100)
    client.cancel(refused)
    assert client.receive(frame(Refused(refused, NOT_FOUND))) == []  # a late refusal ends it
    with pytest.raises(RemoteProtocolError, match="answered already"):
        client.receive(frame(Refused(refused, NOT_FOUND)))


def test_a_piece_for_a_has_request_is_an_error() -> None:
    client = ExchangeClient()
    request_id, _ = client.has(DIGEST)
    with pytest.raises(RemoteProtocolError, match="has-request"):
        client.receive(frame(Piece(request_id, 0, 1, b"a")))


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.binary(max_size=40) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=12,
)


# Shaped like the real messages ([tag, fields...]) so that decoding gets past the tag.
_tagged = st.builds(
    lambda tag, rest: [tag, *rest],
    st.sampled_from(["want", "has", "cancel", "piece", "has-reply", "refused"]),
    st.lists(
        st.integers(-1, 3)
        | st.sampled_from([64, 2**32])
        | st.binary(max_size=40)
        | st.booleans()
        | st.sampled_from(["busy", "nope"])
        | st.just(DIGEST),
        max_size=4,
    ),
)


def _as_frame(value: object) -> bytes:
    body = msgspec.msgpack.encode(value)
    return len(body + b"\x01").to_bytes(4, "big") + b"\x01" + body


@fuzz
@given(st.lists(st.binary(max_size=64) | (_values | _tagged).map(_as_frame), max_size=6))
def test_server_decoder_gives_events_or_a_typed_error(chunks: list[bytes]) -> None:
    server = ExchangeServer(max_outstanding=4)
    try:
        for chunk in chunks:
            for event in server.receive(chunk):
                assert isinstance(event, BlockWanted | HasAsked | RequestCancelled)
    except RemoteProtocolError:
        pass


@fuzz
@given(st.lists(st.binary(max_size=64) | (_values | _tagged).map(_as_frame), max_size=6))
def test_client_decoder_gives_events_or_a_typed_error(chunks: list[bytes]) -> None:
    client = ExchangeClient()
    client.want(DIGEST, 64)
    client.has(OTHER)
    try:
        for chunk in chunks:
            for event in client.receive(chunk):
                assert isinstance(event, BlockReceived | BlockRefused | HasAnswered)
                if isinstance(event, BlockReceived):
                    assert len(event.data) <= 64
    except RemoteProtocolError:
        pass
