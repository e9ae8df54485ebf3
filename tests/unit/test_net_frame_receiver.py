"""The framed lane's receiver: whatever the bytes and however they are cut, what it delivers is
the stream byte for byte; large frames come whole, each in memory of its own whose end is
page-aligned; an oversized header ends framing, never the stream."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.net.frame_receiver import FrameReceiver
from lattica.net.tls_channel import copy_into
from lattica.wire.buffers import PAGE_BYTES, address_of, end_aligned, is_page_aligned

MIN = 1000
MAX = 50_000


def frame(body_bytes: int, fill: int) -> bytes:
    """A frame as the wire has it: a 4-byte length, then that many bytes."""
    return body_bytes.to_bytes(4, "big") + bytes([fill % 256]) * body_bytes


def deliver(receiver: FrameReceiver, stream: bytes, seed: int) -> list[bytes | memoryview]:
    """Feed ``stream`` as TLS would: each read fills a random part of the buffer offered."""
    rng = random.Random(seed)
    out: list[bytes | memoryview] = []
    view = memoryview(stream)
    while view:
        target = receiver.get_buffer()
        assert len(target) >= 1 and not target.readonly
        n = min(len(view), rng.randint(1, len(target)))
        target[:n] = view[:n]
        receiver.buffer_updated(n)
        view = view[n:]
        if rng.random() < 0.3:
            out += receiver.take()
    return out + receiver.take()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60_000), max_size=12), st.integers(0, 2**32 - 1))
def test_the_stream_comes_out_byte_for_byte_and_large_frames_whole(sizes: list[int], seed: int) -> None:
    stream = b"".join(frame(size, i) for i, size in enumerate(sizes))
    receiver = FrameReceiver(min_frame_bytes=MIN, max_frame_bytes=MAX)
    out = deliver(receiver, stream, seed)
    assert b"".join(out) == stream
    large = [item for item in out if isinstance(item, memoryview)]
    framed_sizes = []
    for size in sizes:
        if 4 + size > MAX:
            break  # framing ends at the first oversized header
        framed_sizes.append(4 + size)
    assert [len(item) for item in large] == [n for n in framed_sizes if n >= MIN]
    for item in large:
        assert item.readonly and (address_of(item) + len(item)) % PAGE_BYTES == 0
    assert receiver.framed is all(4 + size <= MAX for size in sizes)


def test_an_oversized_header_switches_to_plain_delivery_for_good() -> None:
    receiver = FrameReceiver(min_frame_bytes=MIN, max_frame_bytes=MAX)
    stream = frame(2000, 1) + (MAX * 4).to_bytes(4, "big") + b"tail" + frame(3000, 2)
    out = deliver(receiver, stream, seed=5)
    assert b"".join(out) == stream
    assert not receiver.framed
    assert [len(item) for item in out if isinstance(item, memoryview)] == [2004]
    # Plain delivery holds no frame in progress: what came is delivered at once.
    copy_into(receiver, b"more")
    assert receiver.take() == [b"more"]


def test_the_end_of_the_stream_delivers_a_frame_cut_short() -> None:
    # The reader's frame decoder must see the truncation, not a clean end (it reports it).
    for cut in (2, 4, 2004 - 1):
        receiver = FrameReceiver(min_frame_bytes=MIN, max_frame_bytes=MAX)
        copy_into(receiver, frame(2000, 3)[:cut])
        assert receiver.take() == [] and receiver.complete_bytes == 0
        assert b"".join(receiver.end()) == frame(2000, 3)[:cut]


def test_small_frames_come_as_one_bytes_object_per_take() -> None:
    receiver = FrameReceiver(min_frame_bytes=MIN, max_frame_bytes=MAX)
    small = b"".join(frame(10, i) for i in range(500)) + frame(0, 0)
    copy_into(receiver, small)
    assert receiver.complete_bytes == len(small)
    assert receiver.take() == [small]


def test_a_whole_block_piece_in_a_large_frame_starts_on_a_page() -> None:
    # What makes the fetch's direct write copy-free: a payload of whole pages at the frame's end.
    receiver = FrameReceiver()
    payload = random.Random(7).randbytes(16 * PAGE_BYTES)
    head = b"\x01piece-fields"
    copy_into(receiver, (len(head) + len(payload)).to_bytes(4, "big") + head + payload)
    [item] = receiver.take()
    assert isinstance(item, memoryview) and is_page_aligned(item[-len(payload) :])
    assert item[-len(payload) :] == payload


def test_bad_updates_and_settings_are_value_errors() -> None:
    receiver = FrameReceiver(min_frame_bytes=MIN, max_frame_bytes=MAX)
    with pytest.raises(ValueError):
        receiver.buffer_updated(0)
    with pytest.raises(ValueError):
        receiver.buffer_updated(5)  # the length prefix has room for 4
    for low, high in ((4, 10), (100, 99)):
        with pytest.raises(ValueError):
            FrameReceiver(min_frame_bytes=low, max_frame_bytes=high)
    with pytest.raises(ValueError):
        end_aligned(-1)
    assert len(end_aligned(0)) == 0
