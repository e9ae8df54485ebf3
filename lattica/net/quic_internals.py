"""The one door to aioquic's private state: every private aioquic name Lattica uses is here.

aioquic's sans-I/O ``QuicConnection`` lacks a few things a peer-to-peer transport needs; this
module adds them on a subclass and a handful of small helpers:

* **Mutual authentication**: a server connection requests the client's certificate
  (``tls._request_client_certificate``, which aioquic marks "for test purposes only"), and the
  peer's certificate is read from ``tls._peer_certificate`` (:func:`peer_certificate`).
* **Stream limits we choose**: ``max_streams_bidi`` granted to the peer comes from the endpoint
  configuration (aioquic hard-codes 128) and peers may open no unidirectional streams.
* **Receive flow control that follows the reader**: aioquic doubles a stream's receive window as
  soon as data *arrives*, so a stalled reader would make us buffer without bound. Here a stream's
  credit is ``bytes the application consumed + window``, so a peer can be at most one window
  ahead of our reader.
* **Pacer clamp**: aioquic's pacer lets one datagram out per wake-up once cwnd/srtt passes about
  19 GB/s (loopback, LAN) because ``bucket_max`` falls below ``packet_time``;
  :class:`ClampedPacer` keeps ``bucket_max >= 16 * packet_time`` (FIELD-NOTES). It also lets
  fast paths burst up to 64 datagrams, as long as that is at most 1 ms of the pacing rate
  (Linux TCP sizes its TSO bursts to ~1 ms too): every burst costs a wake-up on both ends, and a
  16-datagram burst left both processes of the loopback benchmark ~15% of their CPU poorer.
* **Stateless reset tokens that survive a restart** (RFC 9000 section 10.3): aioquic draws each
  connection id's token at random; here it is derived from the id under the node's static key
  (:mod:`lattica.net.stateless_reset`), so a restarted node can reset what it forgot, and
  :attr:`LatticaQuicConnection.peer_reset_token` gives the token of the peer's id in use; a
  server moves off the client's first id (which has none) to one that has a token. Our ids end
  with a tag the node recognises after a restart (``connection_id_for``), so it resets only
  ids it issued.
* **Anti-amplification in full** (RFC 9000 section 8.1): aioquic limits what it builds for an
  unvalidated path to three times what it received, except its CONNECTION_CLOSE, which ignores
  the budget (FIELD-NOTES). :meth:`LatticaQuicConnection.datagrams_to_send` drops whatever
  exceeds the budget.

Guard: the private names are checked when this module is imported (:func:`_check_private_names`);
a missing one raises ``ImportError`` naming the installed aioquic version and the series this
code was tested with (``pyproject.toml`` pins that series). ``tests/unit/test_net_quic_internals.py``
proves each override still does its job.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version as _distribution_version
from typing import Any

from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
)
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream as AioquicStream
from aioquic.quic.stream import QuicStreamSender
from cryptography import x509

TESTED_AIOQUIC_SERIES = "1.7"
"""The aioquic minor series these overrides were written against and tested with."""

# Bursts the pacer allows at high rates: one segmentation-offload send's worth of datagrams
# (see ``datagram._GSO_MAX_SEGMENTS``), but never more than this much of the pacing rate.
PACER_BURST_DATAGRAMS = 64
PACER_BURST_MAX_S = 1e-3
# RFC 9000 section 8.1: before its address is validated, send a peer at most 3x what it sent.
AMPLIFICATION_FACTOR = 3


def _check_private_names() -> None:
    """Fail at import, clearly, if the installed aioquic lacks a private name used here."""
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    context = tls.Context(is_client=False)
    sender = QuicStreamSender(stream_id=0, writable=True)
    required: list[tuple[str, object, str]] = [
        ("QuicConnection", QuicConnection, "_initialize"),
        ("QuicConnection", QuicConnection, "_replenish_connection_ids"),
        ("QuicConnection", connection, "_host_cids"),
        ("QuicConnection", connection, "_peer_cid"),
        ("QuicConnection", connection, "_local_initial_source_connection_id"),
        ("QuicConnection", connection, "_peer_cid_available"),
        ("QuicConnection", connection, "_handshake_complete"),
        ("QuicConnection", QuicConnection, "_write_stream_limits"),
        ("QuicConnection", QuicConnection, "_on_max_stream_data_delivery"),
        ("QuicConnection", connection, "_local_max_streams_bidi"),
        ("QuicConnection", connection, "_local_max_streams_uni"),
        ("QuicConnection", connection, "_remote_max_streams_bidi"),
        ("QuicConnection", connection, "_local_next_stream_id_bidi"),
        ("QuicConnection", connection, "_streams"),
        ("QuicConnection", connection, "_handshake_confirmed"),
        ("QuicConnection", connection, "_close_event"),
        ("QuicConnection", connection, "_is_client"),
        ("QuicConnection", connection, "_max_datagram_size"),
        ("QuicConnection", connection, "_network_paths"),
        ("QuicConnection", connection, "_loss"),
        ("QuicPacketRecovery", connection._loss, "_pacer"),
        ("QuicPacketRecovery", connection._loss, "_rtt_initialized"),
        ("QuicPacketRecovery", connection._loss, "_rtt_smoothed"),
        ("tls.Context", context, "_request_client_certificate"),
        ("tls.Context", context, "_peer_certificate"),
        ("QuicStreamSender", sender, "_buffer_start"),
        ("QuicStreamSender", sender, "_buffer_stop"),
    ]
    missing = [f"{owner}.{name}" for owner, obj, name in required if not hasattr(obj, name)]
    if missing:
        raise ImportError(
            f"aioquic {_distribution_version('aioquic')} lacks private names Lattica relies on "
            f"({', '.join(missing)}); lattica/net/quic_internals.py was tested with aioquic "
            f"{TESTED_AIOQUIC_SERIES}.x -- install that series or port the overrides"
        )


_check_private_names()


class ClampedPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer with ``bucket_max`` kept at 16 packet times or more, and at
    ``min(64 packet times, 1 ms)`` or more."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        """aioquic's rate update, then the clamp (FIELD-NOTES, "Pacer bug")."""
        super().update_rate(congestion_window, smoothed_rtt)
        if self.packet_time is not None:
            self.bucket_max = max(
                self.bucket_max,
                16 * self.packet_time,
                min(PACER_BURST_DATAGRAMS * self.packet_time, PACER_BURST_MAX_S),
            )


class LatticaQuicConnection(QuicConnection):
    """A ``QuicConnection`` with mutual auth, chosen stream limits, reader-paced receive windows,
    the pacer clamp and a strict anti-amplification budget. Everything else is aioquic's, driven
    through its public sans-I/O API."""

    def __init__(
        self,
        *,
        max_incoming_streams: int,
        stream_receive_window_bytes: int,
        reset_token_for: Callable[[bytes], bytes] | None = None,
        connection_id_for: Callable[[bytes], bytes] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._reset_token_for = reset_token_for
        self._connection_id_for = connection_id_for
        if connection_id_for is not None:
            # Before anything is sent: the first id is also our initial source id.
            first = self._host_cids[0]
            first.cid = connection_id_for(first.cid)
            self.host_cid = self._local_initial_source_connection_id = first.cid
        self._derive_reset_tokens()  # before _initialize serialises a server's first token
        # Transport parameters are serialised in _initialize, so the limits must be set first.
        self._local_max_streams_bidi.value = self._local_max_streams_bidi.sent = max_incoming_streams
        self._local_max_streams_uni.value = self._local_max_streams_uni.sent = 0
        self._loss._pacer = ClampedPacer(max_datagram_size=self._max_datagram_size)
        self._stream_window = stream_receive_window_bytes
        self._consumed: dict[int, int] = {}

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # Must run after aioquic created the TLS context and before its first flight. A client
            # that still sends no certificate completes the handshake with peer_certificate()
            # returning None; the connection core rejects it.
            self.tls._request_client_certificate = True

    # -- stateless reset ----------------------------------------------------------------------

    def _derive_reset_tokens(self) -> None:
        if self._reset_token_for is None:
            return
        for host_cid in self._host_cids:
            # A client's first id carries no token (RFC 9000 section 10.3: it has none to give).
            if host_cid.stateless_reset_token:
                host_cid.stateless_reset_token = self._reset_token_for(host_cid.cid)

    def _replenish_connection_ids(self) -> None:
        issued = len(self._host_cids)
        super()._replenish_connection_ids()
        if self._connection_id_for is not None:
            for host_cid in self._host_cids[issued:]:  # new, not yet sent or announced
                host_cid.cid = self._connection_id_for(host_cid.cid)
        self._derive_reset_tokens()  # before NEW_CONNECTION_ID frames carry them

    @property
    def peer_reset_token(self) -> bytes | None:
        """The Stateless Reset Token of the peer's connection id our packets now carry, or None
        when the peer gave none for it (a client's first id)."""
        token: bytes | None = self._peer_cid.stateless_reset_token
        return token or None

    # -- anti-amplification -----------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """aioquic's datagrams, minus any beyond 3x what an unvalidated path sent us.

        aioquic applies the budget to what it builds, but not to its CONNECTION_CLOSE; datagrams
        dropped here are un-counted so the path's accounting stays exact."""
        if (
            self._handshake_complete
            and not self._peer_cid.stateless_reset_token
            and self._peer_cid_available
            and self._close_event is None
        ):
            # The peer's first id (a client's) carries no token: move to one of the ids it
            # issued since, which do, so its reset can end this connection if it restarts
            # (RFC 9000 section 5.1.2 lets an endpoint change ids at any time).
            self.change_connection_id()
        datagrams = super().datagrams_to_send(now)
        if not datagrams or not self._network_paths:
            return datagrams
        path = self._network_paths[0]
        if path.is_validated:
            return datagrams
        budget = AMPLIFICATION_FACTOR * path.bytes_received
        excess = path.bytes_sent - budget
        if excess <= 0:
            return datagrams
        kept = list(datagrams)
        while kept and excess > 0:
            data, _ = kept.pop()
            excess -= len(data)
            path.bytes_sent -= len(data)
        return kept

    @property
    def amplification_budget_bytes(self) -> int | None:
        """Bytes we may still send on the current path before its address is validated
        (RFC 9000 section 8.1), or None once it is validated (no limit)."""
        if not self._network_paths:
            return 0
        path = self._network_paths[0]
        if path.is_validated:
            return None
        return max(0, AMPLIFICATION_FACTOR * path.bytes_received - path.bytes_sent)

    # -- receive flow control -------------------------------------------------------------

    def stream_consumed(self, stream_id: int, n_bytes: int) -> bool:
        """Record that the application read ``n_bytes`` more from a stream.

        Returns True when that earns the peer enough new credit (half a window) that a
        MAX_STREAM_DATA frame should go out now.
        """
        consumed = self._consumed.get(stream_id, 0) + n_bytes
        self._consumed[stream_id] = consumed
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        return consumed + self._stream_window - stream.max_stream_data_local >= self._stream_window // 2

    def forget_stream(self, stream_id: int) -> None:
        """Drop the consumption record of a stream the application is done with."""
        self._consumed.pop(stream_id, None)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: AioquicStream
    ) -> None:
        # Replaces aioquic's "double the window when half of it has arrived" with "grant one
        # window beyond what the reader consumed"; the frame writing is aioquic's own.
        assert stream.stream_id is not None
        if stream.max_stream_data_local:
            granted = self._consumed.get(stream.stream_id, 0) + self._stream_window
            if granted - stream.max_stream_data_local >= self._stream_window // 2:
                stream.max_stream_data_local = granted
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    # -- read-only views of private state -------------------------------------------------

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented in the handshake, or ``None``."""
        return peer_certificate(self)

    @property
    def pacer(self) -> QuicPacketPacer:
        """The loss recovery's pacer (a :class:`ClampedPacer` from construction on)."""
        pacer: QuicPacketPacer = self._loss._pacer
        return pacer

    @property
    def handshake_confirmed(self) -> bool:
        """True once the handshake is confirmed (client: the server's HANDSHAKE_DONE arrived,
        which a server only sends after it accepted our certificate)."""
        return self._handshake_confirmed

    @property
    def close_event(self) -> events.ConnectionTerminated | None:
        """Why the connection is closing, as soon as either side started closing it.

        aioquic only emits ``ConnectionTerminated`` after the draining period (3 PTO); this
        lets the driver tell the application at once."""
        return self._close_event

    @property
    def smoothed_rtt_s(self) -> float | None:
        """Smoothed RTT from loss recovery, or None before the first RTT sample."""
        if not self._loss._rtt_initialized:
            return None
        return float(self._loss._rtt_smoothed)

    def can_open_bidi_stream(self) -> bool:
        """True when the peer's MAX_STREAMS lets us open one more bidirectional stream."""
        return self._local_next_stream_id_bidi // 4 < self._remote_max_streams_bidi

    def stream_send_buffered(self, stream_id: int) -> int:
        """Bytes written to a stream that the peer has not acknowledged yet (sent or not)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def has_stream(self, stream_id: int) -> bool:
        """False once aioquic discarded the stream's state (both directions finished)."""
        return stream_id in self._streams


def peer_certificate(quic: QuicConnection) -> x509.Certificate | None:
    """The certificate the peer of ``quic`` presented in the handshake, or ``None``
    (no TLS context yet, or the peer sent none)."""
    context = getattr(quic, "tls", None)
    if context is None:
        return None
    certificate: x509.Certificate | None = context._peer_certificate
    return certificate
