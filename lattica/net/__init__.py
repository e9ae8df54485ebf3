"""QUIC transport: one UDP socket per node carrying authenticated connections, streams and RPC.

Layers inside this package, bottom up: ``datagram`` (socket interface), ``tls_identity`` and
``quic_internals`` (aioquic adapters), ``connection_state`` (the sans-I/O connection core),
``stream``, ``connection`` (its trio driver), ``endpoint``, ``manager``
(one connection per peer), ``rpc_messages`` and ``rpc`` (protocol ids, request/response).
The TLS 1.3-over-TCP fast path beside QUIC: ``yamux`` (sans-I/O stream multiplexer),
``tls_channel`` (sans-I/O TLS with peer-id authentication), ``tcp_connection`` (trio driver)
and ``tcp_transport`` (listener and dialer); its streams are ``QuicStream`` objects too.
``bulk_path`` picks TLS-over-TCP where the peer accepts it directly, else QUIC.
"""

from lattica.net.address import (
    InvalidAddressError,
    PeerAddr,
    format_host_port,
    network_address,
    parse_host_port,
)
from lattica.net.bulk_path import BulkPath
from lattica.net.config import ALPN_PROTOCOL, EndpointConfig
from lattica.net.connection import Connection
from lattica.net.datagram import Address, DatagramSocket, UdpSocket
from lattica.net.endpoint import Endpoint, EndpointSocketError, EndpointStats
from lattica.net.manager import ConnectionManager, ConnectReport
from lattica.net.rpc import ERROR_CODES, PING_PROTOCOL, Rpc
from lattica.net.stream import QuicStream
from lattica.net.tcp_connection import TcpConnection
from lattica.net.tcp_transport import TcpTransport

__all__ = [
    "ALPN_PROTOCOL",
    "ERROR_CODES",
    "PING_PROTOCOL",
    "Address",
    "BulkPath",
    "ConnectReport",
    "Connection",
    "ConnectionManager",
    "DatagramSocket",
    "Endpoint",
    "EndpointConfig",
    "EndpointSocketError",
    "EndpointStats",
    "InvalidAddressError",
    "PeerAddr",
    "QuicStream",
    "Rpc",
    "TcpConnection",
    "TcpTransport",
    "UdpSocket",
    "format_host_port",
    "network_address",
    "parse_host_port",
]
