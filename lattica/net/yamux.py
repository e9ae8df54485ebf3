"""Yamux stream multiplexing, sans-I/O: many streams over one reliable, ordered byte stream.

Follows the yamux specification (hashicorp/yamux ``spec.md``; the same wire libp2p uses as
``/yamux/1.0.0``): 12-byte big-endian headers ``version(8) type(8) flags(16) stream_id(32)
length(32)``; types Data, Window Update, Ping, Go Away; flags SYN, ACK, FIN, RST; the client
opens odd stream ids, the server even ones; every stream starts with a 256 KiB receive window and
grows it with Window Update deltas. :class:`YamuxSession` takes bytes and returns bytes and
events; it reads no clock and touches no socket (keepalive and timeouts belong to the driver,
:mod:`lattica.net.tcp_tls`).

Invariants (the network is hostile):

* **Bounded memory per peer.** A peer may send on a stream only within the window we granted;
  a Data frame longer than the stream's remaining window ends the session with
  :class:`~lattica.errors.RemoteProtocolError` (it is checked from the header, before any payload
  is taken). Payload is handed out as it arrives, never reassembled here; so what the peer can
  make us hold is ``max_streams * stream_window_bytes`` plus one 12-byte header.
* **Bounded streams.** A peer that has ``max_streams`` streams open and opens another ends the
  session (``RemoteProtocolError``); :meth:`YamuxSession.open_stream` refuses
  (``LocalProtocolError``) beyond the same number on our side, so two Lattica nodes with the
  same setting never trip it. A stream stops counting once both directions finished (FIN both
  ways) or either side reset it; TCP ordering guarantees the opener never sees a slot free
  before we do.
* **Stream ids only grow** per opener and must have the opener's parity; a SYN for an id not
  above the last one, of our parity, or 0 is a protocol error. So state for forgotten streams
  is never needed: a frame for a closed id is either a legitimate race (in-flight data after our
  RST, counted against what the stream's window still allowed, remembered for the last
  ``4 * max_streams`` resets; window updates: ignored) or an error.
* **Errors say whose fault it is.** Whatever the peer sends raises only
  :class:`~lattica.errors.RemoteProtocolError` (after which the session is dead and
  :meth:`YamuxSession.data_to_send` holds a Go Away with the protocol-error code); misuse by the
  local application raises :class:`~lattica.errors.LocalProtocolError`.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from lattica.errors import LocalProtocolError, RemoteProtocolError

HEADER: Final = struct.Struct(">BBHII")
HEADER_BYTES: Final = HEADER.size
VERSION: Final = 0

TYPE_DATA: Final = 0
TYPE_WINDOW_UPDATE: Final = 1
TYPE_PING: Final = 2
TYPE_GO_AWAY: Final = 3

FLAG_SYN: Final = 0x1
FLAG_ACK: Final = 0x2
FLAG_FIN: Final = 0x4
FLAG_RST: Final = 0x8
_KNOWN_FLAGS: Final = FLAG_SYN | FLAG_ACK | FLAG_FIN | FLAG_RST

GO_AWAY_NORMAL: Final = 0
GO_AWAY_PROTOCOL_ERROR: Final = 1
GO_AWAY_INTERNAL_ERROR: Final = 2

INITIAL_STREAM_WINDOW_BYTES: Final = 256 * 1024
"""The window every yamux stream starts with (spec: "Flow Control")."""
MAX_WINDOW_BYTES: Final = (1 << 32) - 1
_MAX_STREAM_ID: Final = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """One decoded yamux frame header. ``length`` is the payload size for Data, the window delta
    for Window Update, the opaque value for Ping and the error code for Go Away."""

    type: int
    flags: int
    stream_id: int
    length: int


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """The 12 bytes of one frame header. Raises ``struct.error`` for out-of-range fields."""
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length)


def decode_header(data: bytes) -> FrameHeader:
    """Decode exactly 12 bytes of header.

    Raises :class:`~lattica.errors.RemoteProtocolError` for another version, an unknown type or
    unknown flag bits, and ``ValueError`` if ``data`` is not 12 bytes (a local bug)."""
    if len(data) != HEADER_BYTES:
        raise ValueError(f"a yamux header is {HEADER_BYTES} bytes, not {len(data)}")
    version, frame_type, flags, stream_id, length = HEADER.unpack(data)
    if version != VERSION:
        raise RemoteProtocolError(f"yamux version {version} is not supported")
    if frame_type > TYPE_GO_AWAY:
        raise RemoteProtocolError(f"unknown yamux frame type {frame_type}")
    if flags & ~_KNOWN_FLAGS:
        raise RemoteProtocolError(f"unknown yamux flags {flags:#x}")
    return FrameHeader(frame_type, flags, stream_id, length)


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id`` (it is already acknowledged)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload for ``stream_id``; ``end_stream``: the peer finished its direction (FIN)."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset ``stream_id``: both directions are dead."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SendWindowGrew:
    """The peer granted ``stream_id`` more send window (writers waiting on it may go on)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """The peer answered our ping carrying ``opaque``."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; ``code`` 0 is a normal shutdown."""

    code: int


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """``stream_id`` is finished in both directions (or reset) and no longer counts."""

    stream_id: int


Event = StreamOpened | DataReceived | StreamReset | SendWindowGrew | PingAcknowledged | GoAwayReceived | StreamClosed


class _Stream:
    __slots__ = (
        "fin_received",
        "fin_sent",
        "receive_window",
        "send_window",
        "unacknowledged_consumed",
    )

    def __init__(self) -> None:
        self.send_window = INITIAL_STREAM_WINDOW_BYTES
        self.receive_window = INITIAL_STREAM_WINDOW_BYTES
        self.unacknowledged_consumed = 0
        self.fin_sent = False
        self.fin_received = False


class YamuxSession:
    """One yamux session (one side of one byte stream), sans-I/O.

    ``is_client``: this side opens odd stream ids (the side that dialled). ``max_streams``:
    concurrent streams each side may have open (see the module's invariants).
    ``stream_window_bytes``: the receive window we grant every stream (at least the 256 KiB
    the protocol starts with); the memory a peer may make us hold per stream.
    """

    def __init__(
        self,
        *,
        is_client: bool,
        max_streams: int = 128,
        stream_window_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if not INITIAL_STREAM_WINDOW_BYTES <= stream_window_bytes <= MAX_WINDOW_BYTES:
            raise ValueError(f"stream_window_bytes must be {INITIAL_STREAM_WINDOW_BYTES}..{MAX_WINDOW_BYTES}")
        self.is_client = is_client
        self.max_streams = max_streams
        self.stream_window_bytes = stream_window_bytes
        self._streams: dict[int, _Stream] = {}
        self._local_open = 0
        self._remote_open = 0
        self._next_local_id = 1 if is_client else 2
        self._last_remote_id = 0
        # Streams we reset while the peer could still be sending: the window it had left.
        self._reset_windows: OrderedDict[int, int] = OrderedDict()
        # Frames waiting for data_to_send(): pieces joined once there (payloads are not copied
        # into a growing buffer: that copy cost more than the encryption at bulk rates).
        self._outgoing: list[bytes] = []
        self._outgoing_bytes = 0
        self._header = bytearray()
        self._payload_stream: int | None = None
        self._payload_remaining = 0
        self._payload_fin = False
        self._payload_discard = False
        self._next_ping = 1
        self.go_away_sent = False
        self.go_away_received: int | None = None
        self.terminated = False

    # -- counters the driver reads ------------------------------------------------------

    @property
    def pending_output_bytes(self) -> int:
        """Bytes waiting in :meth:`data_to_send` (the driver bounds it to apply backpressure)."""
        return self._outgoing_bytes

    @property
    def open_streams(self) -> int:
        """Streams currently counting against ``max_streams`` (both openers)."""
        return len(self._streams)

    @property
    def can_open_stream(self) -> bool:
        """True if :meth:`open_stream` would succeed now."""
        return (
            not self.terminated
            and self.go_away_received is None
            and not self.go_away_sent
            and self._local_open < self.max_streams
            and self._next_local_id <= _MAX_STREAM_ID
        )

    def has_stream(self, stream_id: int) -> bool:
        """True while ``stream_id`` is open (in at least one direction, not reset)."""
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` may send on ``stream_id`` now (0 for a closed stream)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_sent:
            return 0
        return stream.send_window

    # -- output ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer, in order; the queue is empty afterwards."""
        return b"".join(self.pieces_to_send())

    def pieces_to_send(self) -> list[bytes]:
        """Like :meth:`data_to_send`, as the queued pieces (headers and payloads) in order,
        so a driver that encrypts piece by piece never copies payloads into one buffer."""
        pieces = self._outgoing
        self._outgoing = []
        self._outgoing_bytes = 0
        return pieces

    def _emit(self, frame_type: int, flags: int, stream_id: int, length: int) -> None:
        self._outgoing.append(HEADER.pack(VERSION, frame_type, flags, stream_id, length))
        self._outgoing_bytes += HEADER_BYTES

    # -- local actions --------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.terminated:
            raise LocalProtocolError("the yamux session is terminated")

    def open_stream(self) -> int:
        """Open a stream and return its id; the SYN (with our window grant) is queued.

        Raises :class:`LocalProtocolError` if ``max_streams`` of ours are open, a Go Away was
        sent or received, or the session is terminated."""
        self._check_usable()
        if not self.can_open_stream:
            raise LocalProtocolError("no new stream may be opened on this session now")
        stream_id = self._next_local_id
        self._next_local_id += 2
        stream = _Stream()
        stream.receive_window = self.stream_window_bytes
        self._streams[stream_id] = stream
        self._local_open += 1
        self._emit(
            TYPE_WINDOW_UPDATE,
            FLAG_SYN,
            stream_id,
            self.stream_window_bytes - INITIAL_STREAM_WINDOW_BYTES,
        )
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data`` (and our FIN if ``end_stream``) on ``stream_id``.

        Raises :class:`LocalProtocolError` if the stream is not open for sending or ``data``
        exceeds :meth:`send_window`."""
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_sent:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if len(data) > stream.send_window:
            raise LocalProtocolError(f"{len(data)} bytes exceed stream {stream_id}'s send window {stream.send_window}")
        if not data and not end_stream:
            return
        stream.send_window -= len(data)
        flags = FLAG_FIN if end_stream else 0
        self._emit(TYPE_DATA, flags, stream_id, len(data))
        if data:
            self._outgoing.append(bytes(data))
            self._outgoing_bytes += len(data)
        if end_stream:
            stream.fin_sent = True
            self._maybe_forget(stream_id, stream)

    def stream_consumed(self, stream_id: int, n_bytes: int) -> None:
        """The application read ``n_bytes`` of ``stream_id``: re-open that much window (a
        Window Update is queued once half the window is owed, as go-yamux does)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_received or self.terminated:
            return
        stream.unacknowledged_consumed += n_bytes
        if stream.unacknowledged_consumed >= self.stream_window_bytes // 2:
            delta = stream.unacknowledged_consumed
            stream.unacknowledged_consumed = 0
            stream.receive_window += delta
            self._emit(TYPE_WINDOW_UPDATE, 0, stream_id, delta)

    def reset_stream(self, stream_id: int) -> None:
        """Abort ``stream_id`` in both directions (RST). No-op for a stream already gone."""
        stream = self._streams.get(stream_id)
        if stream is None or self.terminated:
            return
        self._emit(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
        if not stream.fin_received:
            self._remember_reset(stream_id, stream.receive_window)
        self._forget(stream_id)

    def _remember_reset(self, stream_id: int, window: int) -> None:
        self._reset_windows[stream_id] = window
        while len(self._reset_windows) > 4 * self.max_streams:
            self._reset_windows.popitem(last=False)

    def ping(self) -> int:
        """Queue a ping; returns the opaque value its :class:`PingAcknowledged` will carry."""
        self._check_usable()
        opaque = self._next_ping
        self._next_ping = (self._next_ping + 1) & 0xFFFFFFFF or 1
        self._emit(TYPE_PING, FLAG_SYN, 0, opaque)
        return opaque

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Tell the peer we accept no new streams (``code`` 0) or are ending the session
        (any other code: the session is terminated). Idempotent."""
        if self.go_away_sent:
            return
        self.go_away_sent = True
        self._emit(TYPE_GO_AWAY, 0, 0, code)
        if code != GO_AWAY_NORMAL:
            self.terminated = True

    # -- stream bookkeeping -----------------------------------------------------------------

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.is_client

    def _forget(self, stream_id: int) -> None:
        del self._streams[stream_id]
        if self._is_local(stream_id):
            self._local_open -= 1
        else:
            self._remote_open -= 1

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> bool:
        if stream.fin_sent and stream.fin_received:
            self._forget(stream_id)
            return True
        return False

    # -- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they caused, in order.

        Raises :class:`RemoteProtocolError` for anything the protocol forbids; the session is
        then terminated and a Go Away (protocol error) is queued for the peer."""
        if self.terminated:
            return []
        events: list[Event] = []
        try:
            self._receive(data, events)
        except RemoteProtocolError:
            self.go_away(GO_AWAY_PROTOCOL_ERROR)
            self.terminated = True
            raise
        return events

    def _receive(self, data: bytes, events: list[Event]) -> None:
        position = 0
        size = len(data)
        while position < size:
            if self._payload_remaining:
                take = min(self._payload_remaining, size - position)
                chunk = data[position : position + take]
                position += take
                self._payload_remaining -= take
                done = self._payload_remaining == 0
                self._deliver(chunk, done, events)
                continue
            need = HEADER_BYTES - len(self._header)
            self._header += data[position : position + need]
            position += need
            if len(self._header) < HEADER_BYTES:
                return
            header = decode_header(bytes(self._header))
            self._header.clear()
            self._handle_header(header, events)

    def _deliver(self, chunk: bytes, done: bool, events: list[Event]) -> None:
        stream_id = self._payload_stream
        assert stream_id is not None
        end_stream = done and self._payload_fin
        # Discard: a frame racing our RST, or payload of a stream we reset mid-frame.
        if self._payload_discard or stream_id not in self._streams:
            if done:
                self._payload_stream = None
            return
        if chunk or end_stream:
            events.append(DataReceived(stream_id, chunk, end_stream))
        if done:
            self._payload_stream = None
            if end_stream:
                self._finish_remote(stream_id, events)

    def _finish_remote(self, stream_id: int, events: list[Event]) -> None:
        stream = self._streams[stream_id]
        stream.fin_received = True
        if self._maybe_forget(stream_id, stream):
            events.append(StreamClosed(stream_id))

    def _handle_header(self, header: FrameHeader, events: list[Event]) -> None:
        if header.type == TYPE_PING:
            self._handle_ping(header, events)
        elif header.type == TYPE_GO_AWAY:
            if header.stream_id != 0:
                raise RemoteProtocolError("a Go Away frame must use stream 0")
            if self.go_away_received is None:
                self.go_away_received = header.length
                events.append(GoAwayReceived(header.length))
        else:
            self._handle_stream_frame(header, events)

    def _handle_ping(self, header: FrameHeader, events: list[Event]) -> None:
        if header.stream_id != 0:
            raise RemoteProtocolError("a Ping frame must use stream 0")
        if header.flags & FLAG_SYN:
            self._emit(TYPE_PING, FLAG_ACK, 0, header.length)
        elif header.flags & FLAG_ACK:
            events.append(PingAcknowledged(header.length))

    def _handle_stream_frame(self, header: FrameHeader, events: list[Event]) -> None:
        stream_id = header.stream_id
        if stream_id == 0:
            raise RemoteProtocolError("Data and Window Update frames need a stream id")
        flags = header.flags
        if flags & FLAG_SYN:
            accepted = self._accept(stream_id, events)
            if accepted is None:
                self._handle_closed_stream_frame(header)
                return
            stream = accepted
        else:
            found = self._streams.get(stream_id)
            if found is None:
                self._handle_closed_stream_frame(header)
                return
            stream = found
        if flags & FLAG_ACK and not self._is_local(stream_id):
            raise RemoteProtocolError(f"ACK for stream {stream_id}, which the peer opened")
        if header.type == TYPE_WINDOW_UPDATE:
            self._grow_send_window(stream_id, stream, header.length, events)
        if flags & FLAG_RST:
            if header.type == TYPE_DATA and header.length:
                raise RemoteProtocolError("a reset frame carries no payload")
            self._forget(stream_id)
            events.append(StreamReset(stream_id))
            return
        fin = bool(flags & FLAG_FIN)
        if fin and stream.fin_received:
            raise RemoteProtocolError(f"second FIN on stream {stream_id}")
        if header.type == TYPE_DATA:
            if stream.fin_received:
                raise RemoteProtocolError(f"data after FIN on stream {stream_id}")
            if header.length > stream.receive_window:
                raise RemoteProtocolError(
                    f"{header.length} bytes on stream {stream_id} exceed its window {stream.receive_window}"
                )
            stream.receive_window -= header.length
            if header.length:
                self._payload_stream = stream_id
                self._payload_remaining = header.length
                self._payload_fin = fin
                self._payload_discard = False
                return
        if fin:
            events.append(DataReceived(stream_id, b"", True))
            self._finish_remote(stream_id, events)

    def _accept(self, stream_id: int, events: list[Event]) -> _Stream | None:
        if self._is_local(stream_id):
            raise RemoteProtocolError(f"SYN for stream {stream_id}, which has our parity")
        if stream_id <= self._last_remote_id:
            raise RemoteProtocolError(f"SYN for stream {stream_id}, not above the last one")
        if self.go_away_sent:
            # We announced we take no new streams: refuse this one, the session goes on.
            self._last_remote_id = stream_id
            self._emit(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            self._remember_reset(stream_id, INITIAL_STREAM_WINDOW_BYTES)
            return None
        if self._remote_open >= self.max_streams:
            raise RemoteProtocolError(f"the peer opened more than {self.max_streams} concurrent streams")
        self._last_remote_id = stream_id
        stream = _Stream()
        self._streams[stream_id] = stream
        self._remote_open += 1
        # Acknowledge at once, granting our window beyond the initial 256 KiB.
        stream.receive_window = self.stream_window_bytes
        self._emit(
            TYPE_WINDOW_UPDATE,
            FLAG_ACK,
            stream_id,
            self.stream_window_bytes - INITIAL_STREAM_WINDOW_BYTES,
        )
        events.append(StreamOpened(stream_id))
        return stream

    def _grow_send_window(self, stream_id: int, stream: _Stream, delta: int, events: list[Event]) -> None:
        if not delta:
            return
        if stream.send_window + delta > MAX_WINDOW_BYTES:
            raise RemoteProtocolError(f"window update overflows stream {stream_id}'s window")
        stream.send_window += delta
        events.append(SendWindowGrew(stream_id))

    def _handle_closed_stream_frame(self, header: FrameHeader) -> None:
        stream_id = header.stream_id
        known = stream_id < self._next_local_id if self._is_local(stream_id) else stream_id <= self._last_remote_id
        if not known:
            raise RemoteProtocolError(f"frame for stream {stream_id}, which was never opened")
        if header.type != TYPE_DATA or not header.length:
            return  # window updates, FINs and RSTs racing our close are harmless
        remaining = self._reset_windows.get(stream_id)
        if remaining is None or header.length > remaining:
            raise RemoteProtocolError(f"data for stream {stream_id} after it was closed")
        self._reset_windows[stream_id] = remaining - header.length
        self._payload_stream = stream_id
        self._payload_remaining = header.length
        self._payload_fin = False
        self._payload_discard = True
