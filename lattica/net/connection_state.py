"""Sans-I/O core of one Lattica QUIC connection: aioquic's ``QuicConnection`` plus our policy.

The core takes bytes and ``now`` in and gives datagrams and events out; it never reads a clock,
sleeps or touches a socket (no trio import). The trio driver (:mod:`lattica.net.connection`)
feeds it datagrams and timer expiries, sends what :meth:`ConnectionState.datagrams_to_send`
returns and reacts to its events. The policy it adds to aioquic:

* **Authentication** (DESIGN.md, "Peer authentication in the handshake"): on aioquic's
  ``HandshakeCompleted`` the peer's certificate must name an Ed25519 key (its peer id) and, for
  outbound connections, the peer id that was dialled; otherwise the connection is closed with a
  TLS alert code and :class:`HandshakeFailed` is emitted. A client may send as soon as it saw
  the server's CertificateVerify (one round trip); the server checks the client's certificate on
  its Finished.
* **Handshake deadline**: a handshake not authenticated by ``handshake_timeout_s`` is aborted.
* **Keepalive**: a PING after ``keepalive_interval_s`` without receiving anything.
* **Streams**: peers may open at most ``max_incoming_streams`` (enforced by aioquic through the
  limit we advertise); late data for streams the application closed is credited and dropped.
* **Anti-amplification** (RFC 9000 section 8.1): on an unvalidated path nothing beyond 3x the
  bytes received leaves, the courtesy CONNECTION_CLOSE included (see ``quic_internals``).
* **Closing says whose fault it was**: :class:`ConnectionClosed` carries ``initiator``:
  ``"local"`` (we closed, or our policy refused the peer), ``"peer"`` (the peer closed, or broke
  the protocol), ``"network"`` (idle timeout, or the path refused our datagrams).

The path is an object the core does not interpret: today a ``(host, port)`` tuple, later a relay
circuit or a punched path. It is handed to aioquic (which only compares and hashes it) and comes
back with each datagram to send.

Invariants: events come out in the order things happened; :class:`ConnectionClosed` is emitted
once, before :class:`ConnectionTerminated`, which is the last event; after it the state sends
nothing and ignores input.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, cast

from aioquic.quic import events as quic_events
from aioquic.quic.packet import QuicErrorCode

from lattica.errors import LocalProtocolError, RemoteProtocolError
from lattica.identity import PeerId
from lattica.net.config import EndpointConfig
from lattica.net.quic_internals import LatticaQuicConnection
from lattica.net.tls_identity import peer_id_from_certificate

logger = logging.getLogger("lattica.net.connection")

PathT = TypeVar("PathT", bound=Hashable)

Direction = Literal["inbound", "outbound"]
CloseInitiator = Literal["local", "peer", "network"]
HandshakeFailure = Literal["no-certificate", "peer-mismatch", "timeout", "closed"]

# TLS alert certificate_required (116) as a QUIC CRYPTO_ERROR (RFC 9001 section 4.8).
CERTIFICATE_REQUIRED_ERROR = 0x100 + 116
# Application-level "this is not the peer you dialled".
PEER_MISMATCH_ERROR = 0x100 + 42  # TLS bad_certificate
# Application error code on RESET_STREAM / STOP_SENDING when a stream is abandoned.
STREAM_CANCELLED = 0x1

# aioquic's loss detection compares `now - loss_delay` with `sent_time`; when the timer fires at
# exactly `sent_time + loss_delay`, float rounding can leave the packet "not yet lost" and the
# timer unchanged, so a driver woken at that instant spins forever under a mock clock. A
# microsecond past the deadline always makes progress (FIELD-NOTES, "Timer spins").
TIMER_SLACK_S = 1e-6


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The peer proved its identity; the connection may be handed to the application."""

    peer_id: PeerId


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The handshake ended without authentication. ``expected``/``actual`` are set for
    ``failure == "peer-mismatch"``."""

    failure: HandshakeFailure
    reason: str
    expected: PeerId | None = None
    actual: PeerId | None = None


@dataclass(frozen=True, slots=True)
class ConnectionIdIssued:
    """Datagrams carrying this destination connection id belong to this connection."""

    connection_id: bytes


@dataclass(frozen=True, slots=True)
class ConnectionIdRetired:
    """This connection id no longer names this connection."""

    connection_id: bytes


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a bidirectional stream (its first data follows as
    :class:`StreamDataReceived`)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamDataReceived:
    """Bytes (possibly none) on a stream the application holds; ``end_stream`` is the peer's FIN."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer abandoned its direction of a stream (RESET_STREAM)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StopSendingReceived:
    """The peer asked us to stop sending on a stream (STOP_SENDING)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection started closing; nothing new may be sent on it. Emitted once."""

    reason: str
    initiator: CloseInitiator


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection holds no more state worth keeping; the last event."""


ConnectionEvent = (
    Authenticated
    | HandshakeFailed
    | ConnectionIdIssued
    | ConnectionIdRetired
    | StreamOpened
    | StreamDataReceived
    | StreamReset
    | StopSendingReceived
    | ConnectionClosed
    | ConnectionTerminated
)


class StreamSendRefused(Exception):
    """aioquic refused stream data because the peer stopped reading (STOP_SENDING already
    reset our side) or the stream is gone; the driver reports it as the peer's doing."""


# -- the state machine ---------------------------------------------------------------------


class ConnectionState(Generic[PathT]):
    """One connection's protocol state and Lattica's policy on top of aioquic. Pure state: no
    sockets, no clock; every method that depends on time takes ``now`` (seconds)."""

    def __init__(
        self,
        quic: LatticaQuicConnection,
        *,
        direction: Direction,
        path: PathT,
        now: float,
        config: EndpointConfig,
        expected_peer: PeerId | None = None,
        handshake_timeout_s: float | None = None,
    ) -> None:
        self._quic = quic
        self.direction: Direction = direction
        self.path: PathT = path
        """The path the state was created with (not interpreted)."""
        self.current_path: PathT = path
        """The path the latest datagrams went to: differs from :attr:`path` once aioquic has
        validated a new one, e.g. after the peer's NAT rebound it to another port (RFC 9000
        section 9.3)."""
        self._config = config
        self._expected_peer = expected_peer
        self._peer_id: PeerId | None = None
        self.created_at = now
        """When the state was created (the handshake deadline counts from here)."""
        self.established_at: float = now
        """When authentication completed (before that, when the state was created)."""
        self.last_stream_activity_at: float = now
        """When a stream was last opened, accepted or closed."""
        timeout_s = config.handshake_timeout_s if handshake_timeout_s is None else handshake_timeout_s
        self._handshake_deadline = now + timeout_s
        self._handshake: Literal["pending", "authenticated", "failed"] = "pending"
        self.close_reason: str | None = None
        self.close_initiator: CloseInitiator | None = None
        self._close_requested = False
        self._terminate_after_send = False
        self._terminated = False
        self._events: deque[ConnectionEvent] = deque()

        self._app_streams: set[int] = set()
        self._forgotten_peer_streams: set[int] = set()
        self._prune_forgotten_at = 64
        self._stream_cap_logged = False

        self._last_received_at = now
        self._unpumped_at: float | None = None
        """Set when aioquic may hold events not yet translated (see :meth:`receive_datagram`)."""
        self._keepalive_at = math.inf
        self._ping_uid = 0
        self.reset_by_peer = False
        """The peer ended this connection with a Stateless Reset (it restarted)."""

    # -- state ----------------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId | None:
        """The authenticated peer id, or None before authentication."""
        return self._peer_id

    @property
    def is_authenticated(self) -> bool:
        """True once the peer proved its identity (stays True after closing)."""
        return self._handshake == "authenticated"

    @property
    def handshake_done(self) -> bool:
        """True once the handshake either authenticated or failed."""
        return self._handshake != "pending"

    @property
    def is_closed(self) -> bool:
        """True once either side started closing (or it timed out, or the path failed)."""
        return self.close_initiator is not None

    @property
    def is_terminated(self) -> bool:
        """True once the state is finished: it sends nothing more and ignores input."""
        return self._terminated

    @property
    def rtt_s(self) -> float | None:
        """Smoothed round-trip time in seconds, or None before the first sample."""
        return self._quic.smoothed_rtt_s

    @property
    def last_received_at(self) -> float:
        """The ``now`` of the last datagram received (the creation time before any)."""
        return self._last_received_at

    @property
    def open_stream_count(self) -> int:
        """Streams the application holds and has not closed."""
        return len(self._app_streams)

    @property
    def host_connection_id(self) -> bytes:
        """Our current connection id (the destination id of packets sent to us)."""
        return self._quic.host_cid

    # -- input ----------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Start the handshake (outbound connections only)."""
        if self.direction != "outbound":
            raise LocalProtocolError("only an outbound connection dials")
        self._quic.connect(self.path, now=now)
        self._pump_quic_events(now)

    def receive_datagram(self, data: bytes, path: PathT, now: float) -> None:
        """Feed one datagram that arrived on ``path`` at ``now``."""
        if self._terminated:
            return
        self._last_received_at = now
        try:
            self._quic.receive_datagram(data, path, now)
        except Exception:
            # aioquic turns protocol violations into CONNECTION_CLOSE itself; anything escaping
            # is a bug there, and must end this connection only.
            logger.exception("aioquic failed on a datagram from %s; closing", path)
            self._quic.close(error_code=QuicErrorCode.INTERNAL_ERROR, reason_phrase="internal error")
        # aioquic's events are translated once per receive batch, not per datagram (the driver
        # reads them after the batch): the receive path is this process's bottleneck.
        self._unpumped_at = now

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next, or None if nothing is scheduled."""
        if self._terminated:
            return None
        deadline = math.inf
        timer = self._quic.get_timer()
        if timer is not None:
            deadline = timer
        if self._handshake == "pending":
            deadline = min(deadline, self._handshake_deadline)
        elif self._handshake == "authenticated" and not self.is_closed:
            deadline = min(deadline, self._keepalive_at)
        return None if deadline == math.inf else deadline

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: handshake deadline, aioquic's timers, keepalive.

        Call :meth:`datagrams_to_send` afterwards."""
        self._pump_received()
        if self._terminated:
            return
        if self._handshake == "pending" and now >= self._handshake_deadline:
            timeout_s = self._handshake_deadline - self.created_at
            self._fail_handshake("timeout", f"timed out after {timeout_s:g} s", reason="handshake timeout")
            self._terminate_after_send = True
            return
        timer = self._quic.get_timer()
        if timer is not None and now >= timer:
            was_open = self._quic.close_event is None
            self._quic.handle_timer(max(now, timer) + TIMER_SLACK_S)
            if was_open and self._quic.close_event is not None and not self.is_closed:
                # aioquic's idle timeout: nobody closed it, the network went quiet.
                self._mark_closed(_describe_close(self._quic.close_event), "network")
        if self._handshake == "authenticated" and not self.is_closed and now >= self._keepalive_at:
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
        self._pump_quic_events(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, PathT]]:
        """Datagrams to send now, each with its path (within the anti-amplification budget)."""
        self._pump_received()
        if self._terminated:
            return []
        try:
            datagrams = self._quic.datagrams_to_send(now)
        except Exception:
            if not self._terminate_after_send:
                raise
            # A connection that never got keys cannot even say goodbye.
            datagrams = []
        self._pump_quic_events(now)
        if self._terminate_after_send:
            self._terminate()
        # aioquic hands back the path object it was given (its NetworkAddress is Any).
        typed = cast("list[tuple[bytes, PathT]]", datagrams)
        if typed:
            self.current_path = typed[-1][1]
        return typed

    def next_event(self) -> ConnectionEvent | None:
        """The next event, oldest first, or None."""
        self._pump_received()
        if self._events:
            return self._events.popleft()
        return None

    # -- commands -------------------------------------------------------------------------

    def close(self, reason: str = "") -> None:
        """Close the connection (CONNECTION_CLOSE with ``reason``), as the application. Idempotent."""
        self._pump_received()
        if self.is_closed:
            return
        self._close_requested = True
        self._mark_closed(reason or "closed locally", "local")
        if not self._terminated:
            self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)

    def abort(self, reason: str) -> None:
        """Give up at once: the next :meth:`datagrams_to_send` returns a courtesy close (within
        the amplification budget) and terminates the state."""
        self._pump_received()
        if self._terminated:
            return
        if self._handshake == "pending":
            self._fail_handshake("closed", reason, reason=reason)
        elif self._quic.close_event is None:
            self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
        self._close_requested = True
        self._mark_closed(reason, "local")
        self._terminate_after_send = True

    def probe(self) -> None:
        """Send an ack-eliciting PING now (RFC 9000 section 19.2): a driver that expects data
        and hears nothing asks whether the peer is there. A peer that lost the connection
        answers with a Stateless Reset; a live one with an acknowledgement. Call
        :meth:`datagrams_to_send` afterwards."""
        self._pump_received()
        if self.is_closed or self._handshake != "authenticated":
            return
        self._ping_uid += 1
        self._quic.send_ping(self._ping_uid)

    @property
    def peer_reset_token(self) -> bytes | None:
        """The Stateless Reset Token of the peer's connection id our packets carry now (RFC 9000
        section 10.3), or None when the peer gave none for it."""
        return None if self._terminated else self._quic.peer_reset_token

    def stateless_reset(self) -> None:
        """The peer answered with a Stateless Reset (its token ended a datagram: the driver
        checked): it no longer has this connection (it restarted). End it now, sending nothing
        more (RFC 9000 section 10.3.1)."""
        self._pump_received()
        if self._terminated:
            return
        self.reset_by_peer = True
        self._mark_closed("stateless reset: the peer no longer has this connection (restarted?)", "peer")
        self._terminate()

    def path_failed(self, reason: str) -> None:
        """The path refused our datagrams (bad address, no route): end the connection now,
        the network's fault, without sending anything more."""
        self._pump_received()
        if self._terminated:
            return
        self._mark_closed(reason, "network")
        self._terminate()

    def can_open_stream(self) -> bool:
        """True when the peer's stream limit lets us open one more bidirectional stream."""
        return self._quic.can_open_bidi_stream()

    def open_stream(self, now: float) -> int:
        """Open a bidirectional stream; returns its id.

        Raises :class:`LocalProtocolError` if the connection is closed or the peer's limit is
        reached (check :meth:`can_open_stream`)."""
        if self.is_closed:
            raise LocalProtocolError("the connection is closed")
        if not self.can_open_stream():
            raise LocalProtocolError("the peer's stream limit is reached")
        stream_id = self._quic.get_next_available_stream_id()
        # A zero-length write creates the stream; the peer learns of it with the first data.
        self._quic.send_stream_data(stream_id, b"")
        self._app_streams.add(stream_id)
        self.last_stream_activity_at = now
        return stream_id

    def send_stream_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data`` (and FIN if ``end_stream``) on a stream.

        Raises :class:`StreamSendRefused` when aioquic already reset our side (the peer sent
        STOP_SENDING) or discarded the stream (both directions ended)."""
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except (RuntimeError, ValueError) as exc:
            # FIN-after-FIN cannot happen (the stream object guards it) and peers cannot open
            # unidirectional streams, so either way the peer has stopped reading.
            raise StreamSendRefused(str(exc)) from exc

    def stream_send_buffered(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        return self._quic.stream_send_buffered(stream_id)

    def stream_consumed(self, stream_id: int, n_bytes: int) -> bool:
        """The application read ``n_bytes`` (negative: put back). True when the peer should be
        granted more credit now (call :meth:`datagrams_to_send`)."""
        return self._quic.stream_consumed(stream_id, n_bytes)

    def close_stream(self, stream_id: int, now: float, *, reset_send: bool, stop_receive: bool) -> None:
        """The application is done with a stream: reset our unfinished direction and/or ask the
        peer to stop sending (code ``STREAM_CANCELLED``), then forget it."""
        if not self.is_closed and self._quic.has_stream(stream_id):
            if reset_send:
                self._quic.reset_stream(stream_id, STREAM_CANCELLED)
            if stop_receive:
                self._quic.stop_stream(stream_id, STREAM_CANCELLED)
        if stream_id in self._app_streams:
            self._app_streams.discard(stream_id)
            self.last_stream_activity_at = now
            self._quic.forget_stream(stream_id)
            if self._is_peer_stream(stream_id):
                self._forgotten_peer_streams.add(stream_id)
                self._prune_forgotten_streams()

    # -- internals ------------------------------------------------------------------------

    def _pump_received(self) -> None:
        now = self._unpumped_at
        if now is not None:
            self._unpumped_at = None
            self._pump_quic_events(now)

    def _is_peer_stream(self, stream_id: int) -> bool:
        client_initiated = stream_id % 2 == 0
        return client_initiated != (self.direction == "outbound")

    def _pump_quic_events(self, now: float) -> None:
        quic = self._quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, quic_events.StreamDataReceived):
                self._on_stream_data(event, now)
            elif isinstance(event, quic_events.HandshakeCompleted):
                self._on_handshake_completed(now)
            elif isinstance(event, quic_events.ConnectionIdIssued):
                self._events.append(ConnectionIdIssued(event.connection_id))
            elif isinstance(event, quic_events.ConnectionIdRetired):
                self._events.append(ConnectionIdRetired(event.connection_id))
            elif isinstance(event, quic_events.StreamReset):
                if event.stream_id in self._app_streams:
                    self._events.append(StreamReset(event.stream_id, event.error_code))
            elif isinstance(event, quic_events.StopSendingReceived):
                if event.stream_id in self._app_streams:
                    self._events.append(StopSendingReceived(event.stream_id, event.error_code))
            elif isinstance(event, quic_events.ConnectionTerminated):
                if not self.is_closed:
                    self._mark_closed(_describe_close(event), self._aioquic_close_initiator())
                self._terminate()
                return
        close_event = quic.close_event
        if close_event is not None and not self.is_closed:
            self._mark_closed(_describe_close(close_event), self._aioquic_close_initiator())

    def _aioquic_close_initiator(self) -> CloseInitiator:
        # aioquic closes by itself when the peer closed or broke the protocol (our own closes
        # set _close_requested; its idle timeout is caught in handle_timer).
        return "local" if self._close_requested else "peer"

    def _on_handshake_completed(self, now: float) -> None:
        if self._handshake != "pending":
            return
        try:
            peer = peer_id_from_certificate(self._quic.peer_certificate)
        except RemoteProtocolError as exc:
            logger.info("rejecting %s: %s", self.path, exc)
            self._fail_handshake(
                "no-certificate",
                str(exc),
                reason="client certificate required" if self.direction == "inbound" else str(exc),
                error_code=CERTIFICATE_REQUIRED_ERROR,
            )
            return
        if self._expected_peer is not None and peer != self._expected_peer:
            self._fail_handshake(
                "peer-mismatch",
                f"dialled {self._expected_peer} but the peer proved to be {peer}",
                reason="peer id mismatch",
                error_code=PEER_MISMATCH_ERROR,
                expected=self._expected_peer,
                actual=peer,
            )
            return
        # Server side: the handshake completes on the client's Finished, after the client's
        # CertificateVerify. Client side: after the server's CertificateVerify. Either way the
        # peer's identity is proven here.
        self._peer_id = peer
        self._handshake = "authenticated"
        self.established_at = now
        self._keepalive_at = now + self._config.keepalive_interval_s
        self._events.append(Authenticated(peer))

    def _fail_handshake(
        self,
        failure: HandshakeFailure,
        detail: str,
        *,
        reason: str,
        error_code: int = QuicErrorCode.NO_ERROR,
        expected: PeerId | None = None,
        actual: PeerId | None = None,
    ) -> None:
        """Emit HandshakeFailed and close with ``reason`` (our policy refused: local)."""
        if self._handshake != "pending":
            return
        self._handshake = "failed"
        self._events.append(HandshakeFailed(failure, detail, expected, actual))
        if self._quic.close_event is None:
            self._close_requested = True
            self._quic.close(error_code=error_code, reason_phrase=reason)
        if not self.is_closed:
            self._mark_closed(reason, "local")

    def _mark_closed(self, reason: str, initiator: CloseInitiator) -> None:
        if self.is_closed:
            return
        self.close_reason = reason
        self.close_initiator = initiator
        if self._handshake == "pending":
            # Set before, so _fail_handshake does not close a second time.
            detail = f"closed the handshake: {reason}" if initiator == "peer" else reason
            self._fail_handshake("closed", detail, reason=reason)
        self._events.append(ConnectionClosed(reason, initiator))
        logger.debug("connection to %s closed (%s): %s", self.path, initiator, reason)

    def _terminate(self) -> None:
        if self._terminated:
            return
        if not self.is_closed:
            self._mark_closed("terminated", "network")
        self._terminated = True
        self._events.append(ConnectionTerminated())

    def _on_stream_data(self, event: quic_events.StreamDataReceived, now: float) -> None:
        if self._handshake == "failed" or self.is_closed:
            return
        stream_id = event.stream_id
        if stream_id not in self._app_streams:
            if not self._is_peer_stream(stream_id) or stream_id in self._forgotten_peer_streams:
                # Late data for a stream the application already closed.
                self._quic.stream_consumed(stream_id, len(event.data))
                return
            self._app_streams.add(stream_id)
            self.last_stream_activity_at = now
            self._events.append(StreamOpened(stream_id))
            if not self._stream_cap_logged and len(self._app_streams) >= self._config.max_incoming_streams:
                self._stream_cap_logged = True
                logger.warning(
                    "connection to %s reached the cap of %d concurrent streams; more wait for flow control",
                    self.path,
                    self._config.max_incoming_streams,
                )
        self._events.append(StreamDataReceived(stream_id, event.data, event.end_stream))

    def _prune_forgotten_streams(self) -> None:
        # Once aioquic discarded a stream it drops late frames itself, so the id can go.
        # Pruning when the set doubles keeps this amortised O(1) per stream.
        if len(self._forgotten_peer_streams) >= self._prune_forgotten_at:
            self._forgotten_peer_streams = {
                sid for sid in self._forgotten_peer_streams if self._quic.has_stream(sid)
            }
            self._prune_forgotten_at = max(64, 2 * len(self._forgotten_peer_streams))


def _describe_close(event: quic_events.ConnectionTerminated) -> str:
    if event.reason_phrase:
        return event.reason_phrase
    if event.error_code == QuicErrorCode.NO_ERROR:
        return "closed by peer"
    return f"error code 0x{event.error_code:x}"
