"""Tunables of the QUIC endpoint, shared by the endpoint and its connections."""

from __future__ import annotations

from dataclasses import dataclass

ALPN_PROTOCOL = "lattica/1"

# Bytes a stream may hold that were written but not yet acknowledged by the peer. ``send_all``
# waits while a stream is at this bound, so a stalled reader never makes us buffer without limit.
# Measured on loopback (bench/transport.py, 128 MiB): 256 KiB held throughput to ~25 MB/s with
# both processes half idle -- the sender waited for ACKs; 1 MiB with a 2 MiB receive window gave
# ~40 MB/s, CPU-bound.
STREAM_SEND_BUFFER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EndpointConfig:
    """Limits and timers of one :class:`~lattica.net.endpoint.Endpoint` (seconds and bytes)."""

    idle_timeout_s: float = 30.0
    """QUIC idle timeout: a connection that hears nothing for this long is closed."""
    keepalive_interval_s: float = 10.0
    """Send a PING after this long without receiving anything, so NAT mappings stay up."""
    handshake_timeout_s: float = 10.0
    """A handshake (inbound or outbound) that has not authenticated by then is dropped."""
    max_incoming_streams: int = 128
    """Concurrent bidirectional streams a peer may have open to us (QUIC max_streams_bidi)."""
    max_connections: int = 1024
    """New inbound connections beyond this many live ones are refused (dropped, logged once)."""
    stream_receive_window_bytes: int = 2 << 20
    """Per-stream receive window: bytes a peer may send ahead of what our reader consumed."""
    connection_receive_window_bytes: int = 8 << 20
    """Initial connection-wide receive window (QUIC initial_max_data)."""
