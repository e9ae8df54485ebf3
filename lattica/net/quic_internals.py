"""The one place that reaches into aioquic's private state, each use small and tested.

aioquic's sans-I/O ``QuicConnection`` lacks a few things a peer-to-peer transport needs; this
module adds them on a subclass and a handful of read-only helpers:

* **Mutual authentication**: a server connection requests the client's certificate
  (see :mod:`lattica.net.tls_identity`).
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
"""

from __future__ import annotations

from typing import Any

from aioquic.quic import events
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
)
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream as AioquicStream

from lattica.net.tls_identity import require_client_certificate

# Bursts the pacer allows at high rates: one segmentation-offload send's worth of datagrams
# (see ``datagram._GSO_MAX_SEGMENTS``), but never more than this much of the pacing rate.
PACER_BURST_DATAGRAMS = 64
PACER_BURST_MAX_S = 1e-3


class ClampedPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer with ``bucket_max`` kept at 16 packet times or more, and at
    ``min(64 packet times, 1 ms)`` or more."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        if self.packet_time is not None:
            self.bucket_max = max(
                self.bucket_max,
                16 * self.packet_time,
                min(PACER_BURST_DATAGRAMS * self.packet_time, PACER_BURST_MAX_S),
            )


class LatticaQuicConnection(QuicConnection):
    """A ``QuicConnection`` with mutual auth, chosen stream limits, reader-paced receive windows
    and the pacer clamp. Everything else is aioquic's, driven through its public sans-I/O API."""

    def __init__(
        self, *, max_incoming_streams: int, stream_receive_window_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        # Transport parameters are serialised in _initialize, so the limits must be set first.
        self._local_max_streams_bidi.value = self._local_max_streams_bidi.sent = max_incoming_streams
        self._local_max_streams_uni.value = self._local_max_streams_uni.sent = 0
        self._loss._pacer = ClampedPacer(max_datagram_size=self._max_datagram_size)
        self._stream_window = stream_receive_window_bytes
        self._consumed: dict[int, int] = {}

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            require_client_certificate(self)

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
