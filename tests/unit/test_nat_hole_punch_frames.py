"""Framing of hole-punching messages on their stream (lattica.nat.hole_punch_service)."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.nat.hole_punch import MAX_MESSAGE_BYTES, Connect, HolePunchDecodeError, HolePunchMessage, Sync
from lattica.nat.hole_punch_service import encode_message_frame, receive_message_frame


class FakeStream:
    """Hands out ``data`` in chunks of at most ``chunk`` bytes, then EOF (b"")."""

    def __init__(self, data: bytes, chunk: int = 3) -> None:
        self.data = data
        self.chunk = chunk

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        n = min(self.chunk, max_bytes or self.chunk)
        out, self.data = self.data[:n], self.data[n:]
        return out


async def read_all(data: bytes, chunk: int = 3) -> list[HolePunchMessage]:
    stream = FakeStream(data, chunk)
    messages = []
    while (message := await receive_message_frame(stream)) is not None:  # type: ignore[arg-type]
        messages.append(message)
    return messages


async def test_frames_round_trip_across_chunk_boundaries() -> None:
    sent: list[HolePunchMessage] = [Connect(addresses=[("203.0.113.7", 4001), ("::1", 5)]), Sync(), Sync()]
    data = b"".join(encode_message_frame(m) for m in sent)
    assert await read_all(data, chunk=1) == sent
    assert await read_all(data, chunk=1000) == sent


async def test_an_oversize_length_is_refused_before_the_body_is_read() -> None:
    stream = FakeStream(struct.pack(">H", MAX_MESSAGE_BYTES + 1) + b"\x00" * 10)
    with pytest.raises(HolePunchDecodeError, match="limit"):
        await receive_message_frame(stream)  # type: ignore[arg-type]
    assert stream.data == b"\x00" * 10


async def test_a_frame_cut_short_is_a_typed_error_and_a_clean_end_is_none() -> None:
    frame = encode_message_frame(Sync())
    with pytest.raises(HolePunchDecodeError, match="ended"):
        await read_all(frame[:-1])
    with pytest.raises(HolePunchDecodeError, match="ended"):
        await read_all(frame[:1])
    assert await read_all(b"") == []


async def test_a_name_instead_of_an_ip_literal_is_refused() -> None:
    body = b"\x82\xa4type\xa7connect\xa9addresses\x91\x92\xa9localhost\xcd\x0f\xa1"
    with pytest.raises(HolePunchDecodeError):
        await read_all(struct.pack(">H", len(body)) + body)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.binary(max_size=2 * MAX_MESSAGE_BYTES), st.integers(min_value=1, max_value=64))
def test_any_bytes_give_messages_or_a_typed_error(data: bytes, chunk: int) -> None:
    async def main() -> None:
        try:
            messages = await read_all(data, chunk)
        except HolePunchDecodeError:
            return
        for message in messages:
            assert isinstance(message, Connect | Sync)

    trio.run(main)
