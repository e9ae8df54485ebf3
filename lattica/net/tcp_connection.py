"""One authenticated TLS 1.3-over-TCP connection carrying yamux streams: the trio driver.

The protocols are sans-I/O (:class:`~lattica.net.tls_channel.TlsChannel` for TLS and peer
authentication, :class:`~lattica.net.yamux.YamuxSession` for streams); this module moves bytes
between them and a TCP socket. Its streams are :class:`~lattica.net.stream.QuicStream` objects
(the class is transport-neutral: it needs only the :class:`~lattica.net.stream.StreamCarrier`
protocol, which :class:`TcpConnection` implements), so RPC and every stream protocol run over
either transport unchanged.

Invariants:

* **One reader, one writer.** The reader task feeds TLS and yamux and never blocks on sending:
  what it produces (window updates, ping answers) is queued and the writer task sends it. So two
  peers sending bulk data to each other cannot deadlock with both readers stuck in a send.
* **Bounded output.** Stream writers may queue data only while fewer than
  ``SEND_HIGH_WATER_BYTES`` are waiting for the socket; the reader stops reading while what it
  must answer (yamux pings and window updates, and TLS's own answers: a KeyUpdate for each one
  the peer requests) exceeds ``MAX_CONTROL_BACKLOG_BYTES``, so a peer that floods them and never
  reads stalls only itself, until the idle timeout closes it. A peer that keeps sending but
  reads nothing is closed too: the writer must get a slice (``SEND_SLICE_BYTES``) into the
  socket every ``idle_timeout_s``.
* **Whose fault.** Stream and connection calls raise ``trio.ClosedResourceError`` after *we*
  closed, ``trio.BrokenResourceError`` after the peer or network did. A peer's protocol error
  closes this connection (with a yamux Go Away), never anything else.
"""

from __future__ import annotations

import logging
import math
from typing import Final, Literal

import trio

from lattica.errors import ConnectError, RemoteProtocolError
from lattica.identity import PeerId
from lattica.net.address import format_host_port
from lattica.net.datagram import Address
from lattica.net.stream import IncomingStreams, QuicStream
from lattica.net.tls_channel import TlsChannel
from lattica.net.yamux import (
    GO_AWAY_NORMAL,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcknowledged,
    SendWindowGrew,
    StreamClosed,
    StreamOpened,
    StreamReset,
    YamuxSession,
)

logger = logging.getLogger("lattica.net.tcp")

RECEIVE_BYTES: Final = 256 * 1024
"""Bytes asked of the socket per read."""
SEND_HIGH_WATER_BYTES: Final = 1024 * 1024
SEND_SLICE_BYTES: Final = 256 * 1024
"""The writer hands the socket this much at a time; a peer must read one slice per
``idle_timeout_s`` (4.4 KB/s at the default 60 s) or the connection is closed."""
"""Stream writers wait while this many bytes are queued for the socket."""
MAX_CONTROL_BACKLOG_BYTES: Final = SEND_HIGH_WATER_BYTES + 256 * 1024
"""The reader pauses while more than this is queued (the excess can only be control frames)."""
_CLOSE_DRAIN_S: Final = 2.0

CloseInitiator = Literal["local", "peer", "network"]


async def tls_handshake(
    tcp: trio.abc.Stream, channel: TlsChannel, *, first_receive_timeout_s: float | None = None
) -> bytes:
    """Run ``channel``'s handshake over ``tcp``; returns application bytes that arrived with it.

    The caller bounds the whole time; ``first_receive_timeout_s`` (if not None) also bounds the
    wait for the peer's first bytes (``trio.TooSlowError``), so a server drops a silent socket
    early: a real client sends its ClientHello at once (RFC 8446 section 2). Raises
    :class:`~lattica.errors.RemoteProtocolError` (the peer's TLS or certificate is invalid),
    :class:`~lattica.errors.ConnectError` (the peer closed), or ``trio.BrokenResourceError`` (the
    network failed)."""
    channel.start()
    leftover = b""
    first_limit_s = math.inf if first_receive_timeout_s is None else first_receive_timeout_s
    while True:
        outgoing = channel.data_to_send()
        if outgoing:
            await tcp.send_all(outgoing)
        if channel.handshake_complete:
            return leftover
        with trio.fail_after(first_limit_s):
            data = await tcp.receive_some(RECEIVE_BYTES)
        first_limit_s = math.inf
        if not data:
            raise ConnectError("the peer closed the connection during the TLS handshake")
        leftover = channel.receive_data(data)


def raise_if_closed(close_reason: str | None, close_initiator: CloseInitiator | None, *, what: str) -> None:
    """A carrier's ``check_open``: ``trio.ClosedResourceError`` once *we* closed ``what``,
    ``trio.BrokenResourceError`` once the peer or the network did, nothing while open."""
    if close_reason is None:
        return
    if close_initiator == "local":
        raise trio.ClosedResourceError(f"{what} was closed: {close_reason}")
    raise trio.BrokenResourceError(f"{what} lost: {close_reason}")


class TcpConnection:
    """An authenticated TLS 1.3-over-TCP connection to one peer, carrying yamux streams.

    Create it after :func:`tls_handshake` succeeded and run :meth:`run` in a nursery; it ends
    when the connection closes. ``keepalive_interval_s``: a yamux ping after this long without
    receiving anything; ``idle_timeout_s``: closed after hearing nothing for this long;
    ``idle_close_s``: closed after having no open stream for this long (None: never).
    """

    def __init__(
        self,
        tcp: trio.abc.Stream,
        channel: TlsChannel,
        *,
        remote_address: Address,
        max_streams: int = 128,
        stream_window_bytes: int = 4 * 1024 * 1024,
        keepalive_interval_s: float = 15.0,
        idle_timeout_s: float = 60.0,
        idle_close_s: float | None = None,
        received_with_handshake: bytes = b"",
    ) -> None:
        if channel.peer_id is None:
            raise ValueError("the TLS channel has not authenticated its peer")
        self._tcp = tcp
        self._channel = channel
        self._peer_id: PeerId = channel.peer_id
        self.direction: Literal["inbound", "outbound"] = "outbound" if channel.is_client else "inbound"
        self.remote_address = remote_address
        self._session = YamuxSession(
            is_client=channel.is_client,
            max_streams=max_streams,
            stream_window_bytes=stream_window_bytes,
        )
        self._keepalive_interval_s = keepalive_interval_s
        self._idle_timeout_s = idle_timeout_s
        self._idle_close_s = idle_close_s
        self._pending_input = received_with_handshake
        self._streams: dict[int, QuicStream] = {}
        self._incoming = IncomingStreams()
        self._progress_lot = trio.lowlevel.ParkingLot()
        self._output_lot = trio.lowlevel.ParkingLot()
        self._closed_event = trio.Event()
        self._writer_done = trio.Event()
        self._confirmed = False
        self._confirmed_or_closed = trio.Event()
        self._confirm_ping: int | None = None
        self.close_reason: str | None = None
        """Why the connection closed, once it did."""
        self.close_initiator: CloseInitiator | None = None
        now = trio.current_time()
        self.established_at = now
        """When the handshake completed (``trio.current_time()``)."""
        self.last_received_at = now
        """When bytes from the peer last arrived (``trio.current_time()``)."""
        # While the writer is in a send: when the socket last took a slice (None: not sending).
        self._send_progress_at: float | None = None
        self.last_stream_activity_at = now
        """When a stream was last opened or closed (``trio.current_time()``)."""

    def __repr__(self) -> str:
        where = format_host_port(self.remote_address)
        return f"<TcpConnection {self.direction} {self._peer_id.short()}@{where}>"

    # -- public surface -------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        """The peer's identity, proven in the TLS handshake."""
        return self._peer_id

    @property
    def is_closed(self) -> bool:
        """True once either side closed the connection (or it failed)."""
        return self.close_reason is not None

    @property
    def queued_output_bytes(self) -> int:
        """Bytes of yamux frames waiting for the writer (bounded; see the module's invariants)."""
        return self._session.pending_output_bytes

    @property
    def open_stream_count(self) -> int:
        """Streams of this connection the application has not closed yet."""
        return len(self._streams)

    async def open_stream(self) -> QuicStream:
        """Open a bidirectional stream; waits while ``max_streams`` of ours are open.

        Raises ``trio.ClosedResourceError`` if we closed the connection,
        ``trio.BrokenResourceError`` if the peer (or network) did or the peer sent Go Away.
        """
        while True:
            self.check_open()
            if self._session.go_away_received is not None:
                raise trio.BrokenResourceError("the peer accepts no new streams (Go Away)")
            if self._session.can_open_stream:
                break
            await self._progress_lot.park()
        stream_id = self._session.open_stream()
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        self.last_stream_activity_at = trio.current_time()
        self._wake_writer()
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> QuicStream:
        """The next stream the peer opened. Raises like :meth:`open_stream` once closed."""
        return await self._incoming.accept(self.check_open)

    async def aclose(self, reason: str = "closed") -> None:
        """Close the connection (yamux Go Away, TLS close_notify, then TCP). Idempotent.

        Streams of a connection we closed raise ``trio.ClosedResourceError``."""
        self._close(reason, "local")
        await trio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        """Wait until the connection closed, by either side."""
        await self._closed_event.wait()

    async def wait_confirmed(self) -> None:
        """Wait until the peer answered our first yamux ping: it accepted our certificate (a
        TLS 1.3 client finishes its handshake before the server checked the client's
        certificate). Raises ``ConnectError`` if the connection closes first."""
        if self._confirm_ping is None and not self.is_closed:
            self._confirm_ping = self._session.ping()
            self._wake_writer()
        await self._confirmed_or_closed.wait()
        if not self._confirmed:
            raise ConnectError(f"{self!r} closed before it was confirmed: {self.close_reason}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the connection until it closes; the TCP socket is closed on return."""
        try:
            # Bytes that came with the handshake (often the client's first ping) are fed before
            # the writer starts, so what they make us answer is queued when it first looks.
            self._feed(self._pending_input)
            self._pending_input = b""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._timer_loop)
                task_status.started()
                await self._closed_event.wait()
                if self.close_initiator != "network":
                    # Let the writer send the Go Away and close_notify, briefly.
                    with trio.move_on_after(_CLOSE_DRAIN_S):
                        await self._writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._close("cancelled", "local")
            with trio.CancelScope(shield=True):
                await self._tcp.aclose()

    # -- used by streams (StreamCarrier) --------------------------------------------------

    def check_open(self) -> None:
        """Raise ``trio.ClosedResourceError`` if we closed the connection,
        ``trio.BrokenResourceError`` if the peer or the network did; else nothing."""
        raise_if_closed(self.close_reason, self.close_initiator, what="connection")

    def stream_send_room(self, stream_id: int) -> int:
        """Bytes the stream may queue now: its yamux send window, within the output bound."""
        room = SEND_HIGH_WATER_BYTES - self._session.pending_output_bytes
        return max(0, min(self._session.send_window(stream_id), room))

    def stream_unsent_bytes(self, stream_id: int) -> int:
        """The connection's output not yet taken by the socket (yamux frames of every stream:
        an upper bound for this one)."""
        return self._session.pending_output_bytes

    def send_stream_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        """Queue stream data. Raises ``trio.BrokenResourceError`` if the peer reset the stream."""
        if not self._session.has_stream(stream_id):
            raise trio.BrokenResourceError(f"stream {stream_id} was reset")
        self._session.send_data(stream_id, data, end_stream=end_stream)
        self._wake_writer()

    def stream_consumed(self, stream_id: int, n_bytes: int) -> bool:
        """Credit bytes the application read; True when a window update was queued."""
        before = self._session.pending_output_bytes
        self._session.stream_consumed(stream_id, n_bytes)
        return self._session.pending_output_bytes > before

    def close_stream(self, stream_id: int, *, reset_send: bool, stop_receive: bool) -> None:
        """Forget a stream the application closed; reset it (RST) if a direction is unfinished
        (yamux has no one-directional reset)."""
        self._streams.pop(stream_id, None)
        self.last_stream_activity_at = trio.current_time()
        if (reset_send or stop_receive) and not self._session.terminated:
            self._session.reset_stream(stream_id)
            self._wake_writer()
        self._progress_lot.unpark_all()

    async def transmit(self) -> None:
        """Hand what is queued to the writer task (a checkpoint that is never cancelled)."""
        self._wake_writer()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_progress(self) -> None:
        """Wait until the writer sent something, a window grew, or the connection changed."""
        await self._progress_lot.park()

    # -- internals ------------------------------------------------------------------------

    def _wake_writer(self) -> None:
        if self._output_lot:
            self._output_lot.unpark_all()

    def _close(self, reason: str, initiator: CloseInitiator) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self.close_initiator = initiator
        if initiator == "local":
            self._session.go_away(GO_AWAY_NORMAL)
        logger.debug("%r closed (%s): %s", self, initiator, reason)
        for stream in list(self._streams.values()):
            stream.on_connection_closed()
        self._closed_event.set()
        self._confirmed_or_closed.set()
        self._incoming.wake()
        self._progress_lot.unpark_all()
        self._wake_writer()

    async def _read_loop(self) -> None:
        try:
            while not self.is_closed:
                received = await self._tcp.receive_some(RECEIVE_BYTES)
                if not received:
                    self._close("the peer closed the TCP connection", "peer")
                    return
                self.last_received_at = trio.current_time()
                if not self._feed(self._channel.receive_data(received)):
                    return
                if self._channel.peer_closed:
                    self._close("the peer closed the TLS session", "peer")
                    return
                self._wake_writer()
                # What we must answer (yamux pings and window updates, TLS KeyUpdates) waits
                # for a peer that may never read it: stop reading until it drains.
                while self._output_backlog_bytes() > MAX_CONTROL_BACKLOG_BYTES and not self.is_closed:
                    await self._progress_lot.park()
        except RemoteProtocolError as exc:  # the peer's TLS
            self._protocol_error(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._close(f"connection lost: {exc!r}", "network")

    def _output_backlog_bytes(self) -> int:
        return self._session.pending_output_bytes + self._channel.pending_output_bytes

    def _feed(self, plain: bytes) -> bool:
        """Feed decrypted bytes to yamux; False (and the connection closed) on a protocol error."""
        if not plain:
            return True
        try:
            events = self._session.receive_data(plain)
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
            return False
        self._dispatch(events)
        return True

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        logger.debug("%r: protocol error from the peer: %s", self, exc)
        self._close(f"protocol error: {exc}", "peer")

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.end_stream)
                else:  # the application closed it while the data was on the way
                    self._session.stream_consumed(event.stream_id, len(event.data))
            elif isinstance(event, StreamOpened):
                stream = QuicStream(self, event.stream_id)
                self._streams[event.stream_id] = stream
                self.last_stream_activity_at = trio.current_time()
                self._incoming.push(stream)
            elif isinstance(event, StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    # A yamux RST ends both directions.
                    stream.on_reset(0)
                    stream.on_stop_sending(0)
            elif isinstance(event, PingAcknowledged):
                if event.opaque == self._confirm_ping:
                    self._confirmed = True
                    self._confirmed_or_closed.set()
            elif isinstance(event, GoAwayReceived):
                if event.code != GO_AWAY_NORMAL:
                    self._close(f"the peer went away (yamux code {event.code})", "peer")
            elif isinstance(event, (SendWindowGrew, StreamClosed)):
                pass  # woken below
        self._progress_lot.unpark_all()

    async def _write_loop(self) -> None:
        try:
            while True:
                for piece in self._session.pieces_to_send():
                    self._channel.send(piece)
                closing = self.is_closed
                if closing:
                    self._channel.close()
                wire = self._channel.data_to_send()
                if wire:
                    await self._send(wire)
                self._progress_lot.unpark_all()
                if closing:
                    return
                if not wire and not self._session.pending_output_bytes:
                    await self._output_lot.park()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._close(f"connection lost: {exc!r}", "network")
        finally:
            self._writer_done.set()

    async def _send(self, wire: bytes) -> None:
        # A slice at a time, noting each one the socket took: a peer that reads nothing while
        # it keeps sending (so the idle timeout never fires) is found by _timer_loop.
        view = memoryview(wire)
        self._send_progress_at = trio.current_time()
        try:
            for at in range(0, len(view), SEND_SLICE_BYTES):
                await self._tcp.send_all(view[at : at + SEND_SLICE_BYTES])
                self._send_progress_at = trio.current_time()
        finally:
            self._send_progress_at = None

    async def _timer_loop(self) -> None:
        # Deadlines are computed and compared as the same sums (FIELD-NOTES: timer spins).
        last_ping_at = -math.inf
        while not self.is_closed:
            now = trio.current_time()
            silent_until = self.last_received_at + self._idle_timeout_s
            if now >= silent_until:
                self._close(f"nothing heard for {self._idle_timeout_s:g} s", "network")
                return
            unread_until = math.inf
            if self._send_progress_at is not None:
                unread_until = self._send_progress_at + self._idle_timeout_s
            if now >= unread_until:
                self._close(f"the peer read nothing for {self._idle_timeout_s:g} s", "network")
                return
            idle_until = math.inf
            if self._idle_close_s is not None and not self._streams:
                idle_until = self.last_stream_activity_at + self._idle_close_s
            if now >= idle_until:
                self._close(f"no stream for {self._idle_close_s:g} s", "local")
                return
            ping_at = max(self.last_received_at, last_ping_at) + self._keepalive_interval_s
            if now >= ping_at:
                self._session.ping()
                self._wake_writer()
                last_ping_at = now
                continue
            # A send that starts later is checked at the next wake-up (ping_at comes first).
            await trio.sleep_until(min(silent_until, idle_until, ping_at, unread_until))
