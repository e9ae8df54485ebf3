"""One bidirectional QUIC stream as a trio ``HalfCloseableStream``.

Invariants:

* Sending is bounded: ``send_all`` hands data to QUIC only while the stream holds fewer than
  ``STREAM_SEND_BUFFER_BYTES`` unacknowledged bytes, and waits otherwise. Receiving is bounded by
  the receive window, which only grows as our reader consumes (see ``quic_internals``). So a
  stalled reader stalls the writer on the other side; nothing buffers without limit.
* Errors say whose fault it is: ``trio.ClosedResourceError`` after *we* closed the stream or its
  connection; ``trio.BrokenResourceError`` when the peer reset the stream, asked us to stop
  sending, closed the connection, or the connection timed out.
* ``aclose`` on a stream that did not finish cleanly resets our side and asks the peer to stop
  sending, so neither side waits forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from lattica.errors import RemoteProtocolError
from lattica.identity import PeerId

# What ``receive_some()`` without ``max_bytes`` returns at most.
DEFAULT_RECEIVE_BYTES = 256 * 1024
# A buffered chunk at least this large is returned alone, never joined to the next.
_WHOLE_CHUNK_BYTES = 64 * 1024


class StreamCarrier(Protocol):
    """What a stream needs from the connection that carries it (implemented by
    :class:`~lattica.net.connection.Connection`; this module imports nothing from there)."""

    @property
    def peer_id(self) -> PeerId:
        """The authenticated identity of the peer."""
        ...

    def check_open(self) -> None:
        """Raise ``trio.ClosedResourceError`` (we closed) / ``trio.BrokenResourceError`` (the
        peer or network did) once the connection is closed."""
        ...

    def stream_send_room(self, stream_id: int) -> int:
        """Bytes the stream may still hand to QUIC before its send buffer is full."""
        ...

    def stream_unsent_bytes(self, stream_id: int) -> int:
        """Bytes of the stream queued and not yet taken by the network (an upper bound where the
        carrier counts per connection)."""
        ...

    def send_stream_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        """Queue data; raises ``trio.BrokenResourceError`` if the peer stopped reading. (A
        carrier may also offer ``send_stream_view(stream_id, view)``, which queues a view of
        immutable bytes without copying it: :meth:`QuicStream.send_all` uses it.)"""
        ...

    def stream_consumed(self, stream_id: int, n_bytes: int) -> bool:
        """Credit ``n_bytes`` read (negative: put back); True if a flush should follow."""
        ...

    def close_stream(self, stream_id: int, *, reset_send: bool, stop_receive: bool) -> None:
        """The stream is done: reset/stop what did not finish, forget it."""
        ...

    async def transmit(self) -> None:
        """Send what the connection has to send now."""
        ...

    async def wait_progress(self) -> None:
        """Wait until the connection made progress (ACKs, credit, closing)."""
        ...


class QuicStream(trio.abc.HalfCloseableStream):
    """A bidirectional stream of a :class:`~lattica.net.connection.Connection`."""

    def __init__(self, connection: StreamCarrier, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        # bytes, or read-only views of memory of their own (a framed lane's large frames)
        self._chunks: deque[bytes | memoryview] = deque()
        self._eof_received = False
        self._reset_code: int | None = None
        self._stop_sending_code: int | None = None
        self._eof_sent = False
        self._closed = False
        self._readable = trio.lowlevel.ParkingLot()
        self._sending = False
        self._receiving = False
        self.received_bytes = 0
        """Bytes the peer sent on this stream so far (delivered to it, read or not)."""
        self.sent_bytes = 0
        """Bytes queued on this stream so far (handed to its connection)."""

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} of {self.connection!r}>"

    # -- called by the connection driver --------------------------------------------------

    def on_data(self, data: bytes | memoryview, end_stream: bool) -> None:
        """Bytes (and the peer's FIN if ``end_stream``) arrived for this stream: ``bytes``, or a
        read-only view of memory the stream may keep (nothing else refers to it)."""
        if self._closed:
            # We stopped reading; credit the bytes so the peer is not stuck on flow control
            # before our STOP_SENDING reaches it.
            self.connection.stream_consumed(self.stream_id, len(data))
            return
        if data:
            self._chunks.append(data)
            self.received_bytes += len(data)
        if end_stream:
            self._eof_received = True
        self._wake_reader()

    def on_reset(self, error_code: int) -> None:
        """The peer reset its direction: readers get ``trio.BrokenResourceError``."""
        self._reset_code = error_code
        self._chunks.clear()
        self._wake_reader()

    def on_stop_sending(self, error_code: int) -> None:
        """The peer asked us to stop sending: writers get ``trio.BrokenResourceError``."""
        self._stop_sending_code = error_code

    def on_connection_closed(self) -> None:
        """The connection closed: wake the reader so it sees the error."""
        self._wake_reader()

    def _wake_reader(self) -> None:
        # Data arrives a packet at a time; only a reader that is actually parked needs waking
        # (unpark_all on an empty lot still costs ~3 us, per packet).
        if self._readable:
            self._readable.unpark_all()

    def unreceive(self, data: bytes) -> None:
        """Put bytes back in front of the receive buffer (a protocol header reader read too far).

        They were already credited to the peer; un-crediting keeps the window exact."""
        if data:
            self._chunks.appendleft(data)
            self.connection.stream_consumed(self.stream_id, -len(data))

    @property
    def _receive_finished(self) -> bool:
        return self._eof_received or self._reset_code is not None

    # -- sending --------------------------------------------------------------------------

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was already called on this stream")
        self.connection.check_open()
        if self._stop_sending_code is not None:
            raise trio.BrokenResourceError(
                f"peer stopped reading stream {self.stream_id} (code {self._stop_sending_code})"
            )

    def _send_room(self) -> int:
        return self.connection.stream_send_room(self.stream_id)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; returns once it is within the bounded send buffer.

        Raises ``trio.ClosedResourceError`` if we closed the stream (or its connection) or
        already sent EOF, ``trio.BrokenResourceError`` if the peer stopped reading or the
        connection was lost, ``trio.BusyResourceError`` on concurrent sends.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data).cast("B")
            # A carrier that queues views (a lane: it encrypts them on its thread) is handed
            # slices of immutable bytes as they are; everything else is copied once.
            send_view = getattr(self.connection, "send_stream_view", None) if isinstance(view.obj, bytes) else None
            offset = 0
            while True:
                self._check_can_send()
                if offset >= len(view):
                    break
                room = self._send_room()
                if room <= 0:
                    await self.connection.wait_progress()
                    continue
                before = offset
                if offset == 0 and room >= len(view) and type(data) is bytes:
                    self._send_stream_data(data, end_stream=False)  # immutable and whole: as it is
                    offset = len(view)
                elif send_view is not None:
                    part = view[offset : offset + room]  # a view of immutable bytes: not copied
                    send_view(self.stream_id, part)
                    offset += len(part)
                else:
                    chunk = bytes(view[offset : offset + room])
                    self._send_stream_data(chunk, end_stream=False)
                    offset += len(chunk)
                self.sent_bytes += offset - before
                await self.connection.transmit()
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    @property
    def unsent_bytes(self) -> int:
        """Bytes sent on this stream that its connection still holds (queued, or not yet taken
        by the network): a writer whose data is still on its way has not gone quiet."""
        return self.connection.stream_unsent_bytes(self.stream_id)

    @property
    def taken_bytes(self) -> int:
        """Bytes of this stream its connection has passed on (acknowledged, or taken by the
        socket): growing while a reader takes them, however slowly; still while it does not."""
        return max(0, self.sent_bytes - self.unsent_bytes)

    def _send_stream_data(self, data: bytes, *, end_stream: bool) -> None:
        self.connection.send_stream_data(self.stream_id, data, end_stream=end_stream)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the send buffer has room (or sending would fail at once)."""
        while True:
            try:
                self._check_can_send()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                await trio.lowlevel.checkpoint()
                raise
            if self._send_room() > 0:
                await trio.lowlevel.checkpoint()
                return
            await self.connection.wait_progress()

    async def send_eof(self) -> None:
        """Finish our direction (QUIC FIN); the peer reads ``b""`` after the data. Idempotent."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._eof_sent and not self._closed:
            return
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_can_send()
        self._eof_sent = True
        self._send_stream_data(b"", end_stream=True)
        await self.connection.transmit()

    # -- receiving ------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Bytes the peer sent, at most ``max_bytes`` (``DEFAULT_RECEIVE_BYTES`` if None), as
        many as are buffered up to that; ``b""`` once the peer sent EOF.

        Raises ``trio.BrokenResourceError`` if the peer reset the stream or the connection was
        lost, ``trio.ClosedResourceError`` if we closed the stream or its connection.
        """
        data = await self.receive_buffer(max_bytes)
        return data if type(data) is bytes else bytes(data)

    async def receive_buffer(self, max_bytes: int | None = None) -> bytes | memoryview:
        """:meth:`receive_some` for a reader that takes views: what arrived as a view of memory
        of its own (a large frame on a framed lane, :mod:`lattica.net.frame_receiver`) comes
        back as that read-only view, not copied into ``bytes``. The caller owns it. Raises what
        :meth:`receive_some` raises."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._reset_code is not None:
                    raise trio.BrokenResourceError(
                        f"peer reset stream {self.stream_id} (code {self._reset_code})"
                    )
                if self._chunks:
                    data = self._take(max_bytes)
                    if self.connection.stream_consumed(self.stream_id, len(data)):
                        await self.connection.transmit()
                    else:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if self._eof_received:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                self.connection.check_open()
                await self._readable.park()
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes | memoryview:
        # Every QUIC packet arrives as its own ~1 KiB chunk: returning one chunk per call would
        # cost the reader a scheduler turn per packet. Joining copies, but a copy is far cheaper.
        chunks = self._chunks
        limit = DEFAULT_RECEIVE_BYTES if max_bytes is None else max_bytes
        first = chunks.popleft()
        # A chunk this large (a lane's or a TCP connection's read, not a packet) is worth its
        # own turn: joining it to the next ones would copy every byte again for nothing.
        if len(first) >= limit or not chunks or len(first) >= _WHOLE_CHUNK_BYTES:
            if len(first) > limit:
                chunks.appendleft(first[limit:])
                return first[:limit]
            return first
        parts = [first]
        size = len(first)
        # ... and a large chunk after small ones waits for the next call, whole.
        while chunks and size < limit and len(chunks[0]) < _WHOLE_CHUNK_BYTES:
            chunk = chunks.popleft()
            room = limit - size
            if len(chunk) > room:
                chunks.appendleft(chunk[room:])
                chunk = chunk[:room]
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    # -- closing --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the stream. A direction that did not finish cleanly is reset (ours) or asked to
        stop (the peer's). Idempotent; later calls on the stream raise ClosedResourceError."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._chunks.clear()
        self._wake_reader()
        self.connection.close_stream(
            self.stream_id,
            reset_send=not self._eof_sent and self._stop_sending_code is None,
            stop_receive=not self._receive_finished,
        )
        await self.connection.transmit()


class IncomingStreams:
    """Streams a peer opened that the application has not accepted yet: the accept queue of one
    connection (QUIC or TLS-over-TCP). Bounded by the connection's stream limit."""

    def __init__(self) -> None:
        self._streams: deque[QuicStream] = deque()
        self._lot = trio.lowlevel.ParkingLot()

    def push(self, stream: QuicStream) -> None:
        """A peer opened ``stream``: queue it and wake an acceptor."""
        self._streams.append(stream)
        self._lot.unpark_all()

    def wake(self) -> None:
        """Wake acceptors so they see the connection closed."""
        self._lot.unpark_all()

    async def accept(self, check_open: Callable[[], None]) -> QuicStream:
        """The next queued stream; ``check_open()`` raises once the connection closed and the
        queue is empty (``trio.ClosedResourceError`` / ``trio.BrokenResourceError``)."""
        while True:
            if self._streams:
                await trio.lowlevel.checkpoint()
                return self._streams.popleft()
            check_open()
            await self._lot.park()


class TruncatedFrameError(RemoteProtocolError):
    """A stream ended in the middle of a length-prefixed frame."""


async def receive_exactly(stream: QuicStream, n_bytes: int, *, what: str = "a frame") -> bytes:
    """Exactly ``n_bytes`` from ``stream`` (a frame's length prefix or body), however the peer
    split them. Raises :class:`TruncatedFrameError` (``what`` names the frame in its message)
    when the stream ends first; trio's stream errors when it breaks."""
    data = await receive_exactly_or_eof(stream, n_bytes, what=what)
    if data is None:
        raise TruncatedFrameError(f"the stream ended before {what}")
    return data


async def receive_exactly_or_eof(stream: QuicStream, n_bytes: int, *, what: str = "a frame") -> bytes | None:
    """Like :func:`receive_exactly`, but a stream that ends cleanly before the first byte gives
    ``None`` (the peer sent no more frames); an end after a partial read is still an error."""
    parts: list[bytes] = []
    missing = n_bytes
    while missing:
        data = await stream.receive_some(missing)
        if not data:
            if missing == n_bytes and n_bytes:
                return None
            raise TruncatedFrameError(f"the stream ended {missing} bytes into {what}")
        parts.append(data)
        missing -= len(data)
    return b"".join(parts)
