"""Where a bulk lane's decrypted bytes go: each large wire frame into a buffer of its own.

A lane whose stream carries :mod:`lattica.wire` frames (an RPC stream: the fetch's exchange
stream) reads the 4-byte length of each frame and then decrypts the frame straight into memory
sized for it, whose end is page-aligned (:func:`lattica.wire.buffers.end_aligned`). The stream's
reader gets each large frame whole, as one read-only view: its frame decoder reads it in place,
the exchange client takes a piece's bytes as a view of it, and a whole-block piece (page-sized
multiples) is written to disk with ``O_DIRECT`` from where TLS put it. Before, the bytes of
every piece were copied five times between TLS and the disk (out of the decrypt buffer, into
the frame decoder's buffer, out of msgpack, into the block, into the direct-write buffer).

The shape is asyncio's ``BufferedProtocol``: :meth:`FrameReceiver.get_buffer` says where the
next bytes go, :meth:`FrameReceiver.buffer_updated` says how many went there, and
:meth:`FrameReceiver.take` hands over what is complete, in stream order. Sans-I/O: the lane's
thread drives it (:class:`~lattica.net.tls_channel.TlsChannel.receive_into`).

It only places bytes; it judges nothing. Frames below ``min_frame_bytes`` are delivered as
``bytes`` (joined when adjacent); a header announcing more than ``max_frame_bytes`` switches the
receiver to plain delivery for the rest of the stream, where the reader's own frame decoder
rejects the frame with its typed error. So memory held for one frame in progress is at most
``max_frame_bytes``, and what a peer sends is delivered byte for byte whatever it is.
"""

from __future__ import annotations

from typing import Final

from lattica.wire.buffers import end_aligned

LENGTH_BYTES: Final = 4
"""The big-endian frame length that starts every :mod:`lattica.wire` frame (it counts the
version byte and the body, not itself)."""
DEFAULT_MIN_FRAME_BYTES: Final = 64 * 1024
"""Smaller frames are not worth a buffer of their own."""
DEFAULT_MAX_FRAME_BYTES: Final = 2 * 1024 * 1024
"""A frame above this (length prefix included) ends framed delivery for the stream."""
_PLAIN_READ_BYTES: Final = 64 * 1024


class FrameReceiver:
    """Places a byte stream of wire frames into per-frame buffers (see the module docstring).

    ``min_frame_bytes`` / ``max_frame_bytes``: the frame sizes (length prefix included) that
    get a buffer of their own. Raises ``ValueError`` if ``min_frame_bytes`` is below the length
    prefix or above ``max_frame_bytes``.
    """

    def __init__(
        self,
        *,
        min_frame_bytes: int = DEFAULT_MIN_FRAME_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        if not LENGTH_BYTES < min_frame_bytes <= max_frame_bytes:
            raise ValueError("need 4 < min_frame_bytes <= max_frame_bytes")
        self.min_frame_bytes = min_frame_bytes
        self.max_frame_bytes = max_frame_bytes
        self._length = bytearray(LENGTH_BYTES)
        self._length_view = memoryview(self._length)
        self._length_filled = 0
        self._frame: memoryview | bytearray | None = None  # the frame being filled
        self._frame_filled = 0
        self._plain: bytearray | None = None  # plain delivery from here on
        self._done: list[bytes | memoryview] = []
        self._small: list[bytes] = []  # adjacent small pieces, joined into one when taken
        self._done_bytes = 0

    @property
    def framed(self) -> bool:
        """False once an oversized header switched the stream to plain delivery."""
        return self._plain is None

    @property
    def complete_bytes(self) -> int:
        """Bytes complete and not yet taken."""
        return self._done_bytes

    def get_buffer(self) -> memoryview:
        """Where the next bytes of the stream go (a non-empty writable view, valid until the
        next :meth:`buffer_updated`)."""
        if self._plain is not None:
            return memoryview(self._plain)
        if self._frame is not None:
            return memoryview(self._frame)[self._frame_filled :]
        return self._length_view[self._length_filled :]

    def buffer_updated(self, n_bytes: int) -> None:
        """``n_bytes`` (at least 1, at most the last buffer's length) were written at the start
        of the last :meth:`get_buffer`. Raises ``ValueError`` otherwise."""
        if n_bytes < 1:
            raise ValueError("n_bytes must be at least 1")
        if self._plain is not None:
            if n_bytes > len(self._plain):
                raise ValueError("more bytes than the buffer holds")
            self._complete(bytes(self._plain[:n_bytes]))
            return
        if self._frame is not None:
            if n_bytes > len(self._frame) - self._frame_filled:
                raise ValueError("more bytes than the buffer holds")
            self._frame_filled += n_bytes
            if self._frame_filled == len(self._frame):
                self._finish_frame()
            return
        if n_bytes > LENGTH_BYTES - self._length_filled:
            raise ValueError("more bytes than the buffer holds")
        self._length_filled += n_bytes
        if self._length_filled == LENGTH_BYTES:
            self._start_frame(LENGTH_BYTES + int.from_bytes(self._length, "big"))

    def take(self) -> list[bytes | memoryview]:
        """What is complete, in stream order, and forget it: large frames as read-only views of
        their own memory (the caller owns them), everything else as ``bytes``."""
        self._flush_small()
        done, self._done, self._done_bytes = self._done, [], 0
        return done

    def end(self) -> list[bytes | memoryview]:
        """:meth:`take`, once the stream ended: with the bytes of a frame it did not finish,
        as they came (its reader's frame decoder then reports the truncation)."""
        if self._frame is not None:
            self._complete(bytes(self._frame[: self._frame_filled]))
            self._frame = None
        elif self._length_filled:
            self._complete(bytes(self._length[: self._length_filled]))
        self._length_filled = 0
        return self.take()

    def _start_frame(self, frame_bytes: int) -> None:
        self._length_filled = 0
        if frame_bytes > self.max_frame_bytes:
            self._complete(bytes(self._length))
            self._plain = bytearray(_PLAIN_READ_BYTES)
            return
        if frame_bytes == LENGTH_BYTES:
            self._complete(bytes(self._length))  # an empty frame: its reader says what it means
            return
        frame: memoryview | bytearray = (
            end_aligned(frame_bytes) if frame_bytes >= self.min_frame_bytes else bytearray(frame_bytes)
        )
        frame[:LENGTH_BYTES] = self._length
        self._frame, self._frame_filled = frame, LENGTH_BYTES

    def _finish_frame(self) -> None:
        frame = self._frame
        assert frame is not None
        self._frame = None
        self._complete(frame.toreadonly() if isinstance(frame, memoryview) else bytes(frame))

    def _complete(self, data: bytes | memoryview) -> None:
        # Adjacent small pieces become one delivery (joined once: a burst of tiny frames must
        # not cost a copy of the run per frame).
        if isinstance(data, bytes):
            self._small.append(data)
        else:
            self._flush_small()
            self._done.append(data)
        self._done_bytes += len(data)

    def _flush_small(self) -> None:
        if self._small:
            self._done.append(self._small[0] if len(self._small) == 1 else b"".join(self._small))
            self._small = []
