"""Settings of the network layer: the ``[net]`` table of ``config.toml``.

:class:`EndpointConfig` holds what the QUIC endpoint and its connections read;
:class:`NetConfig` extends it with the connection manager's idle close and the RPC limits, so a
``NetConfig`` can be handed to the endpoint as it is. Each setting has exactly one default, here.
Field types carry their bounds (:mod:`lattica.setting_types`, checked when a file is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.setting_types import ByteSize, Count, Seconds

TcpPort = Annotated[int, msgspec.Meta(ge=0, le=65535)]
"""A TCP port number; 0 means "the same number as the node's UDP port"."""

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

    # 60 s / 15 s: what `lattica init` has always written for the daemon. A keepalive every 15 s
    # keeps the UDP mappings of NATs that forget after 30 s (common on home routers) alive.
    idle_timeout_s: Seconds = 60.0
    """QUIC idle timeout: a connection that hears nothing for this long is closed."""
    keepalive_interval_s: Seconds = 15.0
    """Send a PING after this long without receiving anything, so NAT mappings stay up."""
    handshake_timeout_s: Seconds = 10.0
    """A handshake (inbound or outbound) that has not authenticated by then is dropped."""
    max_incoming_streams: Count = 128
    """Concurrent bidirectional streams a peer may have open to us (QUIC max_streams_bidi)."""
    max_connections: Count = 1024
    """New inbound connections beyond this many live ones are refused (dropped, logged once)."""
    max_handshakes_per_address: Count = 8
    """Inbound handshakes in progress from one source address (an IPv4 address or IPv6 /64);
    Initials beyond them are dropped (the peer's QUIC sends its Initial again): one address
    sending Initials filled ``max_connections`` with half-open connections, and every other
    peer's dial failed. (Spoofed sources are not bounded by this; QUIC Retry would be.)"""
    retry_above_handshakes: Count = 64
    """Once this many inbound handshakes are in progress, a new Initial must prove its address
    with a Retry round trip first (RFC 9000 section 8.1.2): Initials from spoofed sources,
    which no per-address cap bounds, then cost a small Retry and no state."""
    max_connections_per_address: Count = 64
    """Inbound connections (established or not) from one source address at once: peer ids cost
    nothing, so one host completing its handshakes could otherwise hold every one of
    ``max_connections``. A relay circuit carries at most 2."""
    stream_receive_window_bytes: ByteSize = 2 << 20
    """Per-stream receive window: bytes a peer may send ahead of what our reader consumed."""
    connection_receive_window_bytes: ByteSize = 8 << 20
    """Initial connection-wide receive window (QUIC initial_max_data)."""


@dataclass(frozen=True)
class NetConfig(EndpointConfig):
    """Everything the network layer reads: the endpoint's settings plus the connection
    manager's and the RPC layer's (seconds and bytes)."""

    idle_close_s: Seconds = 300.0
    """The connection manager closes a connection with no open stream for this long."""
    rpc_max_concurrent_inbound_per_peer: Count = 64
    """Requests one peer may have running at once on this node; more are answered ``busy``."""
    rpc_max_request_bytes: ByteSize = 1 << 20
    """Largest request frame served; larger ones are refused (``too-large``) before being read."""
    rpc_max_response_bytes: ByteSize = 16 << 20
    """Largest response frame accepted from a peer."""
    rpc_header_timeout_s: Seconds = 10.0
    """A new stream must name its protocol within this long, or it is dropped."""
    rpc_request_timeout_s: Seconds = 30.0
    """After its header, a request must arrive whole within this long (and its reply be taken
    within this long), or the stream is dropped."""
    rpc_max_concurrent_inbound: Count = 512
    """Requests all peers together may have running at once on this node; more are answered
    ``busy`` (peer ids are free, so the per-peer cap alone bounds nothing)."""
    rpc_max_concurrent_inbound_per_address: Count = 128
    """Requests from one source address (an IPv4 address or IPv6 /64) running at once; more are
    answered ``busy``: without it, eight peer ids minted on one host took all of
    ``rpc_max_concurrent_inbound``. Peers reached through a relay count under that relay."""
    tcp_listen: bool = False
    """Also accept TLS 1.3-over-TCP connections (the fast path for bulk transfer on direct
    routes), on the host of ``listen``. Off unless asked: it opens a second port."""
    tcp_port: TcpPort = 0
    """TCP port for ``tcp_listen``; 0: the same port number as the UDP socket."""

