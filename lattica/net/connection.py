"""One authenticated QUIC connection and the small driver around its aioquic state machine.

Driver rules (FIELD-NOTES, "aioquic 1.7 driven from trio"):

* The endpoint feeds every datagram of a receive batch, then calls :meth:`Connection._flush`
  once per touched connection: events are handled, ``datagrams_to_send`` runs once, and every
  task waiting for progress (stream writers waiting for ACKs, openers waiting for MAX_STREAMS)
  is woken, because ACKs raise no event.
* One timer task per connection sleeps in a cancel scope whose deadline is kept equal to the
  earliest of aioquic's ``get_timer()``, the handshake deadline and the keepalive time; whoever
  changes the connection state re-arms it (:meth:`_rearm`). No polling.
* ``_flush`` never runs twice at once: a second caller marks "flush again" and returns, so
  datagrams leave in packet-number order. What one ``datagrams_to_send`` returns leaves in one
  ``send_batch`` (one checkpoint, and one segmentation-offload syscall per run of full packets).

Authentication: a connection is handed to the application only when the peer's certificate
named an Ed25519 key (its peer id) and, for outbound connections, the expected peer id. A client
sees ``HandshakeCompleted`` after one round trip, when the server's CertificateVerify has proven
the server's identity; it may send at once (its first stream data leaves with its Finished).
The server checks the client's certificate on that Finished and closes the connection if it
refuses it, so a refused client learns it from its first request (``BrokenResourceError`` /
``RpcError("connection-lost")``), never by talking to an unproven server. Waiting for the
server's HANDSHAKE_DONE instead would cost every new connection one more round trip (measured:
a DHT step to a new peer took 3 RTT instead of 2).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Literal, Protocol

import trio
from aioquic.quic import events
from aioquic.quic.packet import QuicErrorCode

from lattica.errors import (
    ConnectError,
    LatticaError,
    LocalProtocolError,
    PeerIdMismatchError,
    RemoteProtocolError,
)
from lattica.identity import PeerId
from lattica.net.address import format_host_port
from lattica.net.config import EndpointConfig
from lattica.net.datagram import Address
from lattica.net.stream import QuicStream
from lattica.net.tls_identity import peer_certificate, peer_id_from_certificate

if TYPE_CHECKING:
    from lattica.net.quic_internals import LatticaQuicConnection

logger = logging.getLogger("lattica.net.connection")

# TLS alert certificate_required (116) as a QUIC CRYPTO_ERROR (RFC 9001 section 4.8).
CERTIFICATE_REQUIRED_ERROR = 0x100 + 116
# Application-level "this is not the peer you dialled".
PEER_MISMATCH_ERROR = 0x100 + 42  # TLS bad_certificate

_TIMER_SLACK_S = 1e-6



class ConnectionOwner(Protocol):
    """What a connection needs from the endpoint that carries it."""

    async def _send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None: ...
    def _register_cid(self, cid: bytes, connection: Connection) -> None: ...
    def _unregister_cid(self, cid: bytes, connection: Connection) -> None: ...
    def _connection_authenticated(self, connection: Connection) -> None: ...
    def _connection_terminated(self, connection: Connection) -> None: ...
    def _handshake_failed(self, connection: Connection, reason: str) -> None: ...


class Connection:
    """An authenticated QUIC connection to one peer, carrying bidirectional streams."""

    def __init__(
        self,
        *,
        quic: LatticaQuicConnection,
        owner: ConnectionOwner,
        direction: Literal["inbound", "outbound"],
        remote_address: Address,
        config: EndpointConfig,
        expected_peer: PeerId | None = None,
        handshake_timeout_s: float | None = None,
    ) -> None:
        self._quic = quic
        self._owner = owner
        self.direction: Literal["inbound", "outbound"] = direction
        self.remote_address = remote_address
        self._config = config
        self._expected_peer = expected_peer
        self._peer_id: PeerId | None = None
        now = trio.current_time()
        self.established_at: float = now
        """When authentication completed (``trio.current_time()``)."""
        self.close_reason: str | None = None
        """Why the connection closed, once it did."""
        self.last_stream_activity_at: float = now
        """When a stream was last opened, accepted or closed (``trio.current_time()``)."""

        self._authenticated = False
        self._auth_done = trio.Event()
        self._auth_error: LatticaError | None = None
        self._handshake_deadline = now + (
            config.handshake_timeout_s if handshake_timeout_s is None else handshake_timeout_s
        )
        self._closed_event = trio.Event()
        self._closed_by_us = False
        self._close_requested = False
        self._terminated = False
        self._registered_cids: set[bytes] = set()

        self._streams: dict[int, QuicStream] = {}
        self._forgotten_peer_streams: set[int] = set()
        self._prune_forgotten_at = 64
        self._incoming: deque[QuicStream] = deque()
        self._incoming_event = trio.Event()
        self._progress = trio.Event()
        self._stream_cap_logged = False

        self._timer_scope: trio.CancelScope | None = None
        self._last_received_at = now
        self._keepalive_at = math.inf
        self._ping_uid = 0
        self._flushing = False
        self._flush_again = False

    def __repr__(self) -> str:
        who = self._peer_id.short() if self._peer_id else "?"
        return f"<Connection {self.direction} {who}@{format_host_port(self.remote_address)}>"

    # -- public surface -------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        """The authenticated identity of the peer."""
        if self._peer_id is None:
            raise LocalProtocolError("the connection is not authenticated yet")
        return self._peer_id

    @property
    def rtt_s(self) -> float | None:
        """Smoothed round-trip time in seconds, or None before the first sample."""
        return self._quic.smoothed_rtt_s

    @property
    def last_received_at(self) -> float:
        """When a datagram of this connection last arrived (``trio.current_time()``); the
        connection manager drops a connection that stayed silent through a request timeout."""
        return self._last_received_at

    @property
    def is_closed(self) -> bool:
        """True once either side started closing the connection (or it timed out)."""
        return self._closed_event.is_set()

    @property
    def open_stream_count(self) -> int:
        """Streams of this connection the application has not closed yet."""
        return len(self._streams)

    async def open_stream(self) -> QuicStream:
        """Open a bidirectional stream; waits while the peer's stream limit is reached.

        Raises ``trio.ClosedResourceError`` if we closed the connection,
        ``trio.BrokenResourceError`` if the peer or the network did.
        """
        while True:
            error = self._closed_error()
            if error is not None:
                raise error
            if self._quic.can_open_bidi_stream():
                break
            await self._wait_progress()
        stream_id = self._quic.get_next_available_stream_id()
        # A zero-length write creates the stream; the peer learns of it with the first data.
        self._quic.send_stream_data(stream_id, b"")
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        self.last_stream_activity_at = trio.current_time()
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> QuicStream:
        """The next stream the peer opened. Raises like :meth:`open_stream` once closed."""
        while True:
            if self._incoming:
                await trio.lowlevel.checkpoint()
                return self._incoming.popleft()
            error = self._closed_error()
            if error is not None:
                raise error
            await self._incoming_event.wait()

    async def aclose(self, reason: str = "") -> None:
        """Close the connection (QUIC CONNECTION_CLOSE with ``reason``). Idempotent.

        Streams of a connection we closed raise ``trio.ClosedResourceError``."""
        if not self.is_closed:
            self._close_requested = True
            self._mark_closed(reason or "closed locally", by_us=True)
            if not self._terminated:
                self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
                await self._flush()
        await trio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side or by a timeout."""
        await self._closed_event.wait()

    # -- used by streams ------------------------------------------------------------------

    def _closed_error(self) -> trio.ClosedResourceError | trio.BrokenResourceError | None:
        if not self.is_closed:
            return None
        if self._closed_by_us:
            return trio.ClosedResourceError(f"connection was closed: {self.close_reason}")
        return trio.BrokenResourceError(f"connection lost: {self.close_reason}")

    async def _wait_progress(self) -> None:
        await self._progress.wait()

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _forget_stream(self, stream: QuicStream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            self.last_stream_activity_at = trio.current_time()
            self._quic.forget_stream(stream.stream_id)
            if self._is_peer_stream(stream.stream_id):
                self._forgotten_peer_streams.add(stream.stream_id)
                self._prune_forgotten_streams()

    def _is_peer_stream(self, stream_id: int) -> bool:
        client_initiated = stream_id % 2 == 0
        return client_initiated != (self.direction == "outbound")

    # -- driver ---------------------------------------------------------------------------

    def _datagram_received(self, data: bytes, address: Address, now: float) -> None:
        if self._terminated:
            return
        self._last_received_at = now
        try:
            self._quic.receive_datagram(data, address, now)
        except Exception:
            # aioquic turns protocol violations into CONNECTION_CLOSE itself; anything escaping
            # is a bug there, and must not take the endpoint down.
            logger.exception("aioquic failed on a datagram from %s; closing", address)
            self._quic.close(
                error_code=QuicErrorCode.INTERNAL_ERROR, reason_phrase="internal error"
            )

    async def _flush(self) -> None:
        """Handle events, send what aioquic has to send, re-arm the timer, wake waiters."""
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            # A half-sent batch would only cost retransmissions, but finishing it is cheap.
            with trio.CancelScope(shield=True):
                while True:
                    self._flush_again = False
                    self._process_events()
                    if self._terminated:
                        break
                    datagrams = self._quic.datagrams_to_send(trio.current_time())
                    self._rearm()
                    await self._owner._send_datagrams(datagrams)
                    if not self._flush_again:
                        break
        finally:
            self._flushing = False
        self._notify_progress()

    def _next_deadline(self) -> float:
        if self._terminated:
            return -math.inf
        deadline = math.inf
        timer = self._quic.get_timer()
        if timer is not None:
            deadline = timer
        if not self._auth_done.is_set():
            deadline = min(deadline, self._handshake_deadline)
        elif not self.is_closed:
            deadline = min(deadline, self._keepalive_at)
        return deadline

    def _rearm(self) -> None:
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._next_deadline()

    async def _run_timer(self) -> None:
        """The connection's timer task: runs until the connection terminated."""
        try:
            while not self._terminated:
                with trio.CancelScope(deadline=self._next_deadline()) as scope:
                    self._timer_scope = scope
                    await trio.sleep_forever()
                self._timer_scope = None
                if self._terminated:
                    break
                await self._on_timer(trio.current_time())
        finally:
            self._timer_scope = None

    async def _on_timer(self, now: float) -> None:
        if not self._auth_done.is_set() and now >= self._handshake_deadline:
            timeout_s = self._handshake_deadline - self.established_at
            await self._abort(
                ConnectError(
                    f"handshake with {format_host_port(self.remote_address)} timed out "
                    f"after {timeout_s:g} s"
                ),
                reason="handshake timeout",
            )
            return
        timer = self._quic.get_timer()
        if timer is not None and now >= timer:
            # aioquic's loss detection compares `now - loss_delay` with `sent_time`; when the
            # timer fires at exactly `sent_time + loss_delay`, float rounding can leave the packet
            # "not yet lost" and the timer unchanged, so a timer task woken at that instant spins
            # forever under a mock clock. A microsecond past the deadline always makes progress.
            self._quic.handle_timer(max(now, timer) + _TIMER_SLACK_S)
        if self._authenticated and not self.is_closed and now >= self._keepalive_at:
            interval = self._config.keepalive_interval_s
            # Compare with the same sum the timer was armed with: `now - last >= interval` can be
            # false at `now == last + interval` by float rounding, re-arming the timer to `now`.
            due = self._last_received_at + interval
            if now >= due:
                self._ping_uid += 1
                self._quic.send_ping(self._ping_uid)
                self._keepalive_at = now + interval
            else:
                self._keepalive_at = due
        await self._flush()

    async def _abort(self, error: LatticaError, *, reason: str) -> None:
        """Give up on the connection at once: send a courtesy close, then forget it."""
        if self._terminated:
            return
        if not self._auth_done.is_set():
            self._fail_handshake(error, reason)
        else:
            self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
        self._close_requested = True
        self._mark_closed(reason, by_us=True)
        try:
            datagrams = self._quic.datagrams_to_send(trio.current_time())
        except Exception:  # a connection that never got keys cannot even say goodbye
            datagrams = []
        with trio.CancelScope(shield=True):
            await self._owner._send_datagrams(datagrams)
        self._terminate()

    def _terminate(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        if not self.is_closed:
            self._mark_closed("terminated", by_us=False)
        for cid in list(self._registered_cids):
            self._owner._unregister_cid(cid, self)
        self._registered_cids.clear()
        self._owner._connection_terminated(self)
        self._rearm()
        self._notify_progress()

    def _mark_closed(self, reason: str, *, by_us: bool) -> None:
        if self.is_closed:
            return
        self.close_reason = reason
        self._closed_by_us = by_us
        self._closed_event.set()
        if not self._auth_done.is_set():
            self._fail_handshake(
                ConnectError(
                    f"{format_host_port(self.remote_address)} closed the handshake: {reason}"
                ),
                reason,
            )
        for stream in list(self._streams.values()):
            stream._on_connection_closed()
        self._incoming_event.set()
        self._notify_progress()
        logger.debug("%r closed: %s", self, reason)

    def _register(self, cid: bytes) -> None:
        self._registered_cids.add(cid)
        self._owner._register_cid(cid, self)

    # -- events ---------------------------------------------------------------------------

    def _process_events(self) -> None:
        quic = self._quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake_completed()
            elif isinstance(event, events.ConnectionIdIssued):
                self._register(event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._registered_cids.discard(event.connection_id)
                self._owner._unregister_cid(event.connection_id, self)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset(event.error_code)
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_stop_sending(event.error_code)
            elif isinstance(event, events.ConnectionTerminated):
                if not self.is_closed:
                    self._mark_closed(_describe_close(event), by_us=False)
                self._terminate()
                return
        close_event = quic.close_event
        if close_event is not None and not self.is_closed:
            self._mark_closed(_describe_close(close_event), by_us=self._close_requested)

    def _on_handshake_completed(self) -> None:
        if self._auth_done.is_set():
            return
        try:
            peer = peer_id_from_certificate(peer_certificate(self._quic))
        except RemoteProtocolError as exc:
            logger.info("rejecting %s: %s", format_host_port(self.remote_address), exc)
            self._fail_handshake(
                ConnectError(f"{format_host_port(self.remote_address)}: {exc}"),
                "client certificate required" if self.direction == "inbound" else str(exc),
                error_code=CERTIFICATE_REQUIRED_ERROR,
            )
            return
        if self._expected_peer is not None and peer != self._expected_peer:
            self._fail_handshake(
                PeerIdMismatchError(
                    f"dialled {self._expected_peer} at {format_host_port(self.remote_address)} "
                    f"but the peer there proved to be {peer}"
                ),
                "peer id mismatch",
                error_code=PEER_MISMATCH_ERROR,
            )
            return
        self._peer_id = peer
        # Server side: the handshake completes on the client's Finished, after the client's
        # CertificateVerify. Client side: after the server's CertificateVerify. Either way the
        # peer's identity is proven here.
        self._authenticate()

    def _authenticate(self) -> None:
        now = trio.current_time()
        self._authenticated = True
        self.established_at = now
        self._keepalive_at = now + self._config.keepalive_interval_s
        self._auth_done.set()
        logger.debug("%r authenticated", self)
        self._owner._connection_authenticated(self)
        self._rearm()

    def _fail_handshake(
        self, error: LatticaError, reason: str, *, error_code: int = QuicErrorCode.NO_ERROR
    ) -> None:
        if self._auth_done.is_set():
            return
        self._auth_error = error
        self._auth_done.set()
        self._owner._handshake_failed(self, reason)
        if self._quic.close_event is None:
            self._close_requested = True
            self._quic.close(error_code=error_code, reason_phrase=reason)
        if not self.is_closed:
            self._mark_closed(reason, by_us=True)

    async def _wait_authenticated(self) -> None:
        await self._auth_done.wait()
        if self._auth_error is not None:
            raise self._auth_error

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        if self._auth_error is not None or self.is_closed:
            return
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._is_peer_stream(stream_id) or stream_id in self._forgotten_peer_streams:
                # Late data for a stream we already closed.
                self._quic.stream_consumed(stream_id, len(event.data))
                return
            stream = QuicStream(self, stream_id)
            self._streams[stream_id] = stream
            self.last_stream_activity_at = trio.current_time()
            self._incoming.append(stream)
            self._incoming_event.set()
            self._incoming_event = trio.Event()
            if (
                not self._stream_cap_logged
                and len(self._streams) >= self._config.max_incoming_streams
            ):
                self._stream_cap_logged = True
                logger.warning(
                    "%r reached the cap of %d concurrent streams; more wait for flow control",
                    self,
                    self._config.max_incoming_streams,
                )
        stream._on_data(event.data, event.end_stream)

    def _prune_forgotten_streams(self) -> None:
        # Once aioquic discarded a stream it drops late frames itself, so the id can go.
        # Pruning when the set doubles keeps this amortised O(1) per stream.
        if len(self._forgotten_peer_streams) >= self._prune_forgotten_at:
            self._forgotten_peer_streams = {
                sid for sid in self._forgotten_peer_streams if self._quic.has_stream(sid)
            }
            self._prune_forgotten_at = max(64, 2 * len(self._forgotten_peer_streams))


def _describe_close(event: events.ConnectionTerminated) -> str:
    if event.reason_phrase:
        return event.reason_phrase
    if event.error_code == QuicErrorCode.NO_ERROR:
        return "closed by peer"
    return f"error code 0x{event.error_code:x}"
