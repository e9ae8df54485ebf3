"""One authenticated QUIC connection: the trio driver around its sans-I/O core.

The protocol and Lattica's policy (authentication, handshake deadline, keepalive, stream rules,
anti-amplification) live in :class:`~lattica.net.connection_state.ConnectionState`; this module
only drives it (FIELD-NOTES, "aioquic 1.7 driven from trio"):

* The endpoint feeds every datagram of a receive batch (:meth:`Connection.receive_datagram`),
  then calls :meth:`Connection.handle_events` for each touched connection and
  :meth:`Connection.transmit` once per touched connection: ``datagrams_to_send`` runs once, and
  every task waiting for progress (stream writers waiting for ACKs, openers waiting for
  MAX_STREAMS) is woken, because ACKs raise no event.
* One timer task per connection (:meth:`Connection.run_timer`) sleeps in a cancel scope whose
  deadline is kept equal to the core's ``get_timer()``; whoever changes the state re-arms it.
* ``transmit`` never runs twice at once: a second caller marks "again" and returns, so
  datagrams leave in packet-number order. What one ``datagrams_to_send`` returns leaves in one
  carrier send (one checkpoint, one segmentation-offload syscall per run of full packets).
* A failure to send to this connection's path (an address the socket layer refuses) ends this
  connection -- ``trio.BrokenResourceError`` / ``ConnectError`` to its waiters -- never the
  endpoint (issue 8, A1).

Authentication: a connection is handed to the application only when the core emitted
:class:`~lattica.net.connection_state.Authenticated`. A client may send as soon as the server's
CertificateVerify proved the server's identity; a refused client learns it from its first
request (``BrokenResourceError`` / ``RpcError("connection-lost")``).
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Protocol

import trio

from lattica.errors import (
    ConnectError,
    ConnectTimeoutError,
    LatticaError,
    LocalProtocolError,
    PeerIdMismatchError,
)
from lattica.identity import PeerId
from lattica.net.address import format_host_port
from lattica.net.config import STREAM_SEND_BUFFER_BYTES
from lattica.net.connection_state import (
    Authenticated,
    ConnectionClosed,
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionState,
    ConnectionTerminated,
    HandshakeFailed,
    StopSendingReceived,
    StreamDataReceived,
    StreamOpened,
    StreamReset,
    StreamSendRefused,
)
from lattica.net.datagram import Address
from lattica.net.relayed_path import Path, RelayedPath
from lattica.net.stream import IncomingStreams, QuicStream

logger = logging.getLogger("lattica.net.connection")


class PathSendError(Exception):
    """Raised by a :class:`ConnectionCarrier` when datagrams for one connection's path cannot be
    sent (the socket layer refused the destination); ends that connection only."""


class ConnectionCarrier(Protocol):
    """What a connection needs from the endpoint that carries it."""

    async def send_datagrams(self, datagrams: list[tuple[bytes, Path]]) -> None:
        """Send datagrams in order. Raises :class:`PathSendError` if their destination is
        unusable; other send failures are packet loss."""
        ...

    def connection_id_issued(self, connection_id: bytes, connection: Connection) -> None:
        """Route datagrams with this destination connection id to ``connection``."""
        ...

    def connection_id_retired(self, connection_id: bytes, connection: Connection) -> None:
        """Stop routing this id to ``connection``."""
        ...

    def connection_authenticated(self, connection: Connection) -> None:
        """``connection`` proved its peer id."""
        ...

    def handshake_failed(self, connection: Connection, reason: str) -> None:
        """``connection``'s handshake ended without authentication."""
        ...

    def connection_terminated(self, connection: Connection) -> None:
        """``connection`` holds no more state; forget it."""
        ...


class Connection:
    """An authenticated QUIC connection to one peer, carrying bidirectional streams."""

    def __init__(self, state: ConnectionState[Path], carrier: ConnectionCarrier) -> None:
        self._state = state
        self._carrier = carrier
        self.direction: Literal["inbound", "outbound"] = state.direction
        self.path: Path = state.path
        """Where this connection's datagrams go: an address, or a relay circuit."""
        self._auth_done = trio.Event()
        self._auth_error: LatticaError | None = None
        self._closed_event = trio.Event()
        self._streams: dict[int, QuicStream] = {}
        self._incoming = IncomingStreams()
        # One wake-up primitive for "something changed": trio's ParkingLot (no Event re-creation).
        self._progress_lot = trio.lowlevel.ParkingLot()
        self._timer_scope: trio.CancelScope | None = None
        self._transmitting = False
        self._transmit_again = False

    @property
    def current_path(self) -> Path:
        """Where our datagrams go now: the peer's address, or the relay circuit it is behind."""
        return self._state.current_path

    @property
    def remote_address(self) -> Address:
        """The peer's network address as of the latest datagram sent (it follows the peer when
        its NAT rebinds it to a new port); for a relayed connection, the relay's (never the
        peer's: do not remember it as the peer's address, see :attr:`relayed_via`)."""
        path = self._state.current_path
        return path.relay_address if isinstance(path, RelayedPath) else path

    def __repr__(self) -> str:
        peer = self._state.peer_id
        who = peer.short() if peer else "?"
        via = "" if self.relayed_via is None else f" via {self.relayed_via.short()}"
        return f"<Connection {self.direction} {who}@{format_host_port(self.remote_address)}{via}>"

    # -- public surface -------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        """The authenticated identity of the peer. Raises :class:`LocalProtocolError` before."""
        peer = self._state.peer_id
        if peer is None:
            raise LocalProtocolError("the connection is not authenticated yet")
        return peer

    @property
    def is_authenticated(self) -> bool:
        """True once the peer proved its identity."""
        return self._state.is_authenticated

    @property
    def relayed_via(self) -> PeerId | None:
        """The relay carrying this connection, or None for a direct connection."""
        path = self.path
        return path.relay_peer_id if isinstance(path, RelayedPath) else None

    @property
    def established_at(self) -> float:
        """When authentication completed (``trio.current_time()``)."""
        return self._state.established_at

    @property
    def last_stream_activity_at(self) -> float:
        """When a stream was last opened, accepted or closed (``trio.current_time()``)."""
        return self._state.last_stream_activity_at

    @property
    def close_reason(self) -> str | None:
        """Why the connection closed, once it did."""
        return self._state.close_reason

    @property
    def rtt_s(self) -> float | None:
        """Smoothed round-trip time in seconds, or None before the first sample."""
        return self._state.rtt_s

    @property
    def last_received_at(self) -> float:
        """When a datagram of this connection last arrived (``trio.current_time()``); the
        connection manager drops a connection that stayed silent through a request timeout."""
        return self._state.last_received_at

    @property
    def is_closed(self) -> bool:
        """True once either side started closing the connection (or it timed out)."""
        return self._state.is_closed

    @property
    def open_stream_count(self) -> int:
        """Streams of this connection the application has not closed yet."""
        return self._state.open_stream_count

    async def open_stream(self) -> QuicStream:
        """Open a bidirectional stream; waits while the peer's stream limit is reached.

        Raises ``trio.ClosedResourceError`` if we closed the connection,
        ``trio.BrokenResourceError`` if the peer or the network did.
        """
        while True:
            self.check_open()
            if self._state.can_open_stream():
                break
            await self.wait_progress()
        stream_id = self._state.open_stream(trio.current_time())
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> QuicStream:
        """The next stream the peer opened. Raises like :meth:`open_stream` once closed."""
        return await self._incoming.accept(self.check_open)

    async def aclose(self, reason: str = "") -> None:
        """Close the connection (QUIC CONNECTION_CLOSE with ``reason``). Idempotent.

        Streams of a connection we closed raise ``trio.ClosedResourceError``."""
        if not self.is_closed:
            self._state.close(reason)
            await self.transmit()
        await trio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side or by a timeout."""
        await self._closed_event.wait()

    # -- used by streams (StreamCarrier) --------------------------------------------------

    def check_open(self) -> None:
        """Raise ``trio.ClosedResourceError`` if we closed the connection,
        ``trio.BrokenResourceError`` if the peer or the network did; else nothing."""
        state = self._state
        if not state.is_closed:
            return
        if state.close_initiator == "local":
            raise trio.ClosedResourceError(f"connection was closed: {state.close_reason}")
        raise trio.BrokenResourceError(f"connection lost: {state.close_reason}")

    def stream_send_room(self, stream_id: int) -> int:
        """Bytes a stream may still queue before ``STREAM_SEND_BUFFER_BYTES`` are unacknowledged."""
        return STREAM_SEND_BUFFER_BYTES - self._state.stream_send_buffered(stream_id)

    def stream_unsent_bytes(self, stream_id: int) -> int:
        """Stream bytes queued and not yet acknowledged by the peer."""
        return self._state.stream_send_buffered(stream_id)

    def send_stream_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        """Queue stream data. Raises ``trio.BrokenResourceError`` if the peer stopped reading."""
        try:
            self._state.send_stream_data(stream_id, data, end_stream=end_stream)
        except StreamSendRefused as exc:
            raise trio.BrokenResourceError(f"peer stopped reading stream {stream_id}: {exc}") from exc

    def stream_consumed(self, stream_id: int, n_bytes: int) -> bool:
        """Credit bytes the application read; True when :meth:`transmit` should follow."""
        return self._state.stream_consumed(stream_id, n_bytes)

    def close_stream(self, stream_id: int, *, reset_send: bool, stop_receive: bool) -> None:
        """Forget a stream the application closed, resetting/stopping unfinished directions."""
        self._streams.pop(stream_id, None)
        self._state.close_stream(
            stream_id, trio.current_time(), reset_send=reset_send, stop_receive=stop_receive
        )

    async def wait_progress(self) -> None:
        """Wait until the next transmit or state change (ACKs raise no event of their own)."""
        await self._progress_lot.park()

    # -- driven by the endpoint -----------------------------------------------------------

    def receive_datagram(self, data: bytes, address: Path, now: float) -> None:
        """Feed one datagram; call :meth:`handle_events` and :meth:`transmit` after the batch."""
        self._state.receive_datagram(data, address, now)

    @property
    def peer_reset_token(self) -> bytes | None:
        """The Stateless Reset Token of the peer's connection id in use, or None (see
        :attr:`~lattica.net.connection_state.ConnectionState.peer_reset_token`)."""
        return self._state.peer_reset_token

    @property
    def reset_by_peer(self) -> bool:
        """The peer ended this connection with a Stateless Reset (it restarted)."""
        return self._state.reset_by_peer

    async def probe(self) -> None:
        """Ask the peer whether it is there: one PING, sent now (see
        :meth:`~lattica.net.connection_state.ConnectionState.probe`)."""
        self._state.probe()
        await self.transmit()

    def stateless_reset(self) -> None:
        """The peer reset this connection statelessly (the endpoint matched its token): end it
        now, without a word (RFC 9000 section 10.3.1)."""
        self._state.stateless_reset()
        self.handle_events()

    def start_dial(self, now: float) -> None:
        """Start the handshake of an outbound connection."""
        self._state.connect(now)
        self.handle_events()

    async def wait_authenticated(self) -> None:
        """Wait for the handshake: returns once authenticated; raises the handshake's error
        (:class:`ConnectError`, :class:`PeerIdMismatchError`) otherwise."""
        await self._auth_done.wait()
        if self._auth_error is not None:
            raise self._auth_error

    async def abort(self, reason: str) -> None:
        """Give up on the connection at once: a courtesy close (within the amplification
        budget), then the state is forgotten."""
        if self._state.is_terminated:
            return
        self._state.abort(reason)
        with trio.CancelScope(shield=True):
            await self.transmit()

    async def transmit(self) -> None:
        """Handle events, send what the core has to send, re-arm the timer, wake waiters."""
        if self._transmitting:
            self._transmit_again = True
            return
        self._transmitting = True
        try:
            # A half-sent batch would only cost retransmissions, but finishing it is cheap.
            with trio.CancelScope(shield=True):
                while True:
                    self._transmit_again = False
                    self.handle_events()
                    if self._state.is_terminated:
                        break
                    datagrams = self._state.datagrams_to_send(trio.current_time())
                    self.handle_events()
                    # aioquic's get_timer() is not cheap: once per transmit, not per event batch.
                    self._rearm()
                    if datagrams:
                        try:
                            await self._carrier.send_datagrams(datagrams)
                        except PathSendError as exc:
                            self._state.path_failed(f"the network refused the address: {exc}")
                            self.handle_events()
                            break
                    if not self._transmit_again:
                        break
        finally:
            self._transmitting = False
        self._progress_lot.unpark_all()

    async def run_timer(self) -> None:
        """The connection's timer task: runs until the connection terminated."""
        try:
            while not self._state.is_terminated:
                with trio.CancelScope(deadline=self._next_deadline()) as scope:
                    self._timer_scope = scope
                    await trio.sleep_forever()
                self._timer_scope = None
                if self._state.is_terminated:
                    break
                self._state.handle_timer(trio.current_time())
                await self.transmit()
        finally:
            self._timer_scope = None

    def handle_events(self) -> None:
        """Apply the core's pending events to streams, waiters and the carrier. The timer is
        re-armed by the :meth:`transmit` that must follow."""
        state = self._state
        while (event := state.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.end_stream)
                else:  # closed by the application while the event was queued
                    state.stream_consumed(event.stream_id, len(event.data))
            elif isinstance(event, StreamOpened):
                stream = QuicStream(self, event.stream_id)
                self._streams[event.stream_id] = stream
                self._incoming.push(stream)
            elif isinstance(event, Authenticated):
                self._auth_done.set()
                logger.debug("%r authenticated", self)
                self._carrier.connection_authenticated(self)
            elif isinstance(event, HandshakeFailed):
                self._auth_error = self._handshake_error(event)
                self._auth_done.set()
                self._carrier.handshake_failed(self, event.reason)
            elif isinstance(event, ConnectionIdIssued):
                self._carrier.connection_id_issued(event.connection_id, self)
            elif isinstance(event, ConnectionIdRetired):
                self._carrier.connection_id_retired(event.connection_id, self)
            elif isinstance(event, StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.on_reset(event.error_code)
            elif isinstance(event, StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.on_stop_sending(event.error_code)
            elif isinstance(event, ConnectionClosed):
                self._closed_event.set()
                for stream in list(self._streams.values()):
                    stream.on_connection_closed()
                self._incoming.wake()
                self._progress_lot.unpark_all()
                logger.debug("%r closed (%s): %s", self, event.initiator, event.reason)
            elif isinstance(event, ConnectionTerminated):
                self._carrier.connection_terminated(self)
                self._progress_lot.unpark_all()
                self._rearm()  # lets the timer task end

    # -- internals ------------------------------------------------------------------------

    def _handshake_error(self, event: HandshakeFailed) -> LatticaError:
        where = format_host_port(self.remote_address)
        if event.failure == "peer-mismatch":
            return PeerIdMismatchError(
                f"dialled {event.expected} at {where} but the peer there proved to be {event.actual}"
            )
        if event.failure == "timeout":
            return ConnectTimeoutError(f"handshake with {where} {event.reason}")
        return ConnectError(f"{where}: {event.reason}")

    def _next_deadline(self) -> float:
        if self._state.is_terminated:
            return -math.inf
        timer = self._state.get_timer()
        return math.inf if timer is None else timer

    def _rearm(self) -> None:
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._next_deadline()
