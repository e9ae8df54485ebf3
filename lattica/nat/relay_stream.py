"""Reading and writing relay control frames on a QUIC stream (the trio side of
:mod:`lattica.nat.relay_messages`).

A control frame is read exactly to its end, so the circuit bytes that may follow it in the same
stream stay unread for the circuit; its length is checked before its body is read.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from lattica.errors import MalformedMessageError
from lattica.nat.relay_messages import (
    MAX_RELAY_FRAME_BYTES,
    HopMessage,
    StopMessage,
    check_control_frame_length,
)
from lattica.net.stream import QuicStream, receive_exactly
from lattica.wire import decode_frame, encode_frame

_LENGTH = struct.Struct(">I")


async def receive_hop_message(stream: QuicStream) -> HopMessage:
    """One HOP control frame; raises like :func:`_receive_relay_message`."""
    return cast("HopMessage", await _receive_relay_message(stream, HopMessage))


async def receive_stop_message(stream: QuicStream) -> StopMessage:
    """One STOP control frame; raises like :func:`_receive_relay_message`."""
    return cast("StopMessage", await _receive_relay_message(stream, StopMessage))


async def _receive_relay_message(stream: QuicStream, message_type: Any) -> Any:
    """One control frame of ``message_type`` (a tagged union of Structs).

    Raises a :class:`~lattica.errors.RemoteProtocolError` subclass for an oversize, truncated or
    invalid frame, and trio's stream errors for a broken or closed stream."""
    prefix = await receive_exactly(stream, _LENGTH.size, what="a relay frame")
    (length,) = _LENGTH.unpack(prefix)
    check_control_frame_length(length)
    body = await receive_exactly(stream, length, what="a relay frame")
    try:
        return decode_frame(prefix + body, message_type, max_frame_bytes=MAX_RELAY_FRAME_BYTES)
    except RecursionError:
        raise MalformedMessageError("a relay frame nests too deeply") from None


async def send_relay_message(stream: QuicStream, message: object) -> None:
    """Send one control frame. Raises :class:`~lattica.errors.LocalProtocolError` if it is too
    large to encode (a bug), trio's stream errors if the stream is broken or closed."""
    await stream.send_all(encode_frame(message, max_frame_bytes=MAX_RELAY_FRAME_BYTES))
