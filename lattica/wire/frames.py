"""Length-prefixed msgpack frames carrying msgspec ``Struct`` messages (sans-I/O).

Frame layout: ``u32 big-endian length`` of what follows, then ``u8 version``, then the
msgpack body. Invariants:

* No frame larger than ``max_frame_bytes`` is ever produced or buffered: the decoder checks the
  announced length before it waits for the body.
* Decoding yields either a fully validated message of the expected type or a
  :class:`~lattica.errors.RemoteProtocolError` subclass -- never a half-built object, never
  anything unpickled or evaluated.
* Nesting depth is bounded: msgspec decodes (and skips unknown fields) recursively, and a body
  nested deeper than the interpreter's recursion budget (a few KB of ``0x91`` bytes) raises
  ``RecursionError`` inside it. That is the peer's fault, so it becomes
  :class:`~lattica.errors.MalformedMessageError` like any other bad body. No Lattica message
  nests more than a few levels, so the bound (``sys.getrecursionlimit()`` minus the caller's
  stack, several hundred levels) never refuses a valid one.
"""

from __future__ import annotations

import struct
from typing import Any, Generic, TypeVar

import msgspec

from lattica.errors import (
    FrameTooLargeError,
    LocalProtocolError,
    MalformedMessageError,
    TruncatedFrameError,
    UnsupportedVersionError,
)

WIRE_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 1 << 20
_HEADER = struct.Struct(">IB")
HEADER_BYTES = _HEADER.size

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


_BIN8 = struct.Struct(">BB")
_BIN16 = struct.Struct(">BH")
_BIN32 = struct.Struct(">BI")


def _encode_body(message: Any) -> bytes:
    try:
        return _encoder.encode(message)
    except (TypeError, OverflowError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(message).__name__}: {exc}") from exc


def encode_frame(message: Any, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Encode one message as a frame.

    Raises :class:`LocalProtocolError` when the message cannot be encoded or the encoded frame
    would exceed ``max_frame_bytes``.
    """
    body = _encode_body(message)
    if len(body) + 1 > max_frame_bytes:
        raise LocalProtocolError(f"message of {len(body)} bytes exceeds the {max_frame_bytes}-byte frame limit")
    return _HEADER.pack(len(body) + 1, WIRE_VERSION) + body


_EMPTY_BIN = b"\xc4\x00"  # msgpack bin 8 of length 0: how msgspec encodes b""


def encode_frame_with_payload(
    message: Any, payload: bytes | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """The frame :func:`encode_frame` gives for ``message`` with its last field set to
    ``payload``, where ``message`` is an array-like Struct whose last field is ``bytes`` and
    left empty: the same bytes, built with one copy of ``payload`` (msgspec would copy it into
    its output, and the header prefix once more). For bulk data (pieces of model files) those
    copies were a tenth of the serving daemon's CPU.

    Raises what :func:`encode_frame_parts` raises."""
    return b"".join(encode_frame_parts(message, payload, max_frame_bytes=max_frame_bytes))


def encode_frame_parts(
    message: Any, payload: bytes | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[bytes, memoryview]:
    """:func:`encode_frame_with_payload` as its two parts, not joined: everything before the
    payload, and ``payload`` itself (as a byte view). Sent one after the other they are that
    frame; a sender that takes views sends the payload without copying it at all.

    Raises :class:`LocalProtocolError` like :func:`encode_frame`, and when the message's
    encoding does not end with an empty ``bytes`` field."""
    head = _encode_body(message)
    if not head.endswith(_EMPTY_BIN):
        raise LocalProtocolError(f"{type(message).__name__} does not end with an empty bytes field")
    view = memoryview(payload).cast("B")
    size = len(view)
    # The msgpack bin header msgspec writes for a payload of this size (the smallest that fits).
    if size < 1 << 8:
        marker = _BIN8.pack(0xC4, size)
    elif size < 1 << 16:
        marker = _BIN16.pack(0xC5, size)
    else:
        marker = _BIN32.pack(0xC6, size)
    body_bytes = len(head) - len(_EMPTY_BIN) + len(marker) + size
    if body_bytes + 1 > max_frame_bytes:
        raise LocalProtocolError(f"message of {body_bytes} bytes exceeds the {max_frame_bytes}-byte frame limit")
    return _HEADER.pack(body_bytes + 1, WIRE_VERSION) + head[: -len(_EMPTY_BIN)] + marker, view


class FrameDecoder(Generic[T]):
    """Turns a byte stream into validated messages of one type (a Struct or a tagged union).

    Feed bytes as they arrive with :meth:`feed`; take messages with :meth:`next_message`;
    call :meth:`end_of_stream` when the stream closes to detect a truncated frame.

    ``keeps_views``: the message type has ``msgspec.Raw`` fields, which refer into the frame
    (zero-copy); a frame decoded in place then stays alive with its message.

    Whole frames inside what one :meth:`feed` brought are decoded from it in place; only a
    frame split across feeds is copied into a buffer (and anything fed that is not ``bytes``,
    which its owner may change). Bulk streams (256 KiB pieces of model files) paid three
    copies per byte here otherwise. The decoder holds the last fed object until its frames are
    taken.
    """

    def __init__(
        self, message_type: type[T], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, keeps_views: bool = False
    ):
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(message_type)
        # Messages with msgspec.Raw fields refer into the bytes they were decoded from: those
        # bytes must then outlive the message (never a view of the reused buffer, never released).
        self._keeps_views = keeps_views
        self.last_frame_alone = False
        """Whether the last message's frame was all of the memory its views refer to (a feed
        that was exactly that frame, or a frame copied out of the buffer): a view kept from it
        holds nothing else alive. False for a frame sharing a feed with others, whose views
        keep the whole feed (``keeps_views``: copy what you keep from those)."""
        self._buffer = bytearray()
        # The unconsumed part of the last feed, used in place while the buffer is empty.
        self._fed: memoryview | None = None
        self._fed_at = 0
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes | bytearray | memoryview, *, owned: bool = False) -> None:
        """Append received bytes. ``owned``: ``data`` is a view nobody will change (a stream's
        :meth:`~lattica.net.stream.QuicStream.receive_buffer`), used in place like ``bytes``;
        any other non-``bytes`` object is copied. Raises :class:`FrameTooLargeError` as soon as
        a header announces an oversize frame, so a peer cannot make us buffer it."""
        if not data:
            return
        self._spill()
        if not (owned or isinstance(data, bytes)):  # a caller may reuse a bytearray: copy it
            self._buffer += data
        else:
            view = memoryview(data)
            take = 0
            if self._buffer:  # complete the frame begun in the buffer; the rest stays in place
                take = self._bytes_to_complete(view)
                self._buffer += view[:take]
            if take < len(view):
                # The whole object, not a slice of it: a frame is alone only if it is all of it
                # (a view of a slice keeps the whole object alive all the same).
                self._fed, self._fed_at = view, take
        self._check_header()

    def _bytes_to_complete(self, view: memoryview) -> int:
        """How many bytes of ``view`` belong to the frame(s) the buffer holds (at most all of
        ``view``). Raises :class:`FrameTooLargeError` for a header announcing too much."""
        at = 0  # the buffered frames up to the last, incomplete one
        while len(self._buffer) - at >= HEADER_BYTES:
            length = self._announced(self._buffer[at : at + HEADER_BYTES])
            if len(self._buffer) - at < 4 + length:
                return min(len(view), 4 + length - (len(self._buffer) - at))
            at += 4 + length
        missing_header = HEADER_BYTES - (len(self._buffer) - at)
        if at == len(self._buffer) or len(view) < missing_header:
            return len(view) if at < len(self._buffer) else 0
        length = self._announced(self._buffer[at:] + view[:missing_header])
        return min(len(view), 4 + length - (len(self._buffer) - at))

    def _announced(self, header: bytes | bytearray) -> int:
        length, _version = _HEADER.unpack(header)
        if length > self.max_frame_bytes:
            raise FrameTooLargeError(
                f"peer announced a {length}-byte frame; the limit is {self.max_frame_bytes}"
            )
        return int(length)

    def _spill(self) -> None:
        # Move what is left of the last feed into the buffer (a frame split across feeds).
        if self._fed is not None:
            self._buffer += self._fed[self._fed_at :]
            if not self._keeps_views:
                self._fed.release()
            self._fed = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer) + (len(self._fed) - self._fed_at if self._fed is not None else 0)

    def _check_header(self) -> int | None:
        # The buffer's frames come before the fed bytes.
        if self._buffer or self._fed is None:
            if len(self._buffer) < HEADER_BYTES:
                return None
            length, version = _HEADER.unpack_from(self._buffer)
        else:
            if len(self._fed) - self._fed_at < HEADER_BYTES:
                return None
            length, version = _HEADER.unpack_from(self._fed, self._fed_at)
        if length > self.max_frame_bytes:
            raise FrameTooLargeError(
                f"peer announced a {length}-byte frame; the limit is {self.max_frame_bytes}"
            )
        if length < 1:
            raise MalformedMessageError("zero-length frame")
        if version != WIRE_VERSION:
            raise UnsupportedVersionError(f"wire version {version} (this node speaks {WIRE_VERSION})")
        return int(length)

    def next_message(self) -> T | None:
        """The next complete message, or ``None`` if more bytes are needed.

        Raises a :class:`~lattica.errors.RemoteProtocolError` subclass for a bad frame
        (:class:`MalformedMessageError` for a body that is not a valid message, including one
        nested too deeply); the bad frame is consumed."""
        length = self._check_header()
        if self._buffer:
            if length is None or len(self._buffer) < 4 + length:
                return None  # a partial frame (then nothing was fed after it)
            self.last_frame_alone = True  # decoded from a copy of exactly this frame
            try:
                with memoryview(self._buffer) as view:
                    body = view[HEADER_BYTES : 4 + length]
                    if self._keeps_views:
                        body = memoryview(bytes(body))
                    return self._decode(body)
            finally:
                del self._buffer[: 4 + length]  # consumed, also when it is bad
        if self._fed is None:
            return None
        if length is None or len(self._fed) - self._fed_at < 4 + length:
            self._spill()  # a partial frame: keep it, not the whole fed object
            return None
        fed, start = self._fed, self._fed_at
        self.last_frame_alone = start == 0 and 4 + length == len(fed)
        self._fed_at += 4 + length  # consumed, also when it is bad
        try:
            return self._decode(fed[start + HEADER_BYTES : start + 4 + length])
        finally:
            if self._fed_at == len(fed):
                if not self._keeps_views:
                    fed.release()
                self._fed = None

    def _decode(self, body: memoryview) -> T:
        # msgspec copies what it keeps (bytes fields), so nothing refers to ``body`` afterwards,
        # unless the messages keep views (Raw fields hold an export of ``body``).
        try:
            if self._keeps_views:
                return self._decoder.decode(body)
            with body:
                return self._decoder.decode(body)
        # msgspec raises UnicodeDecodeError (a ValueError) for bad UTF-8 inside some containers.
        except (msgspec.DecodeError, ValueError) as exc:
            raise MalformedMessageError(str(exc)) from exc
        except RecursionError:
            raise MalformedMessageError("message nested too deeply") from None

    def end_of_stream(self) -> None:
        """Declare that no more bytes will come; raises :class:`TruncatedFrameError` if a
        partial frame is buffered."""
        if self.buffered_bytes:
            raise TruncatedFrameError(f"stream ended inside a frame ({self.buffered_bytes} bytes)")


def decode_frame(data: bytes, message_type: type[T], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> T:
    """Decode exactly one whole frame; trailing or missing bytes are errors."""
    decoder = FrameDecoder(message_type, max_frame_bytes=max_frame_bytes)
    decoder.feed(data)
    message = decoder.next_message()
    if message is None:
        raise TruncatedFrameError(f"incomplete frame ({len(data)} bytes)")
    if decoder.buffered_bytes:
        raise MalformedMessageError(f"{decoder.buffered_bytes} bytes after the frame")
    return message
