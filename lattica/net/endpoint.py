"""One datagram socket carrying many QUIC connections, in both roles, plus raw packets.

Demultiplexing rules:

* A datagram whose first byte has the QUIC fixed bit (0x40) clear is not QUIC (STUN starts with
  0x00/0x01): it goes to the raw packet handler.
* Otherwise the destination connection id picks the connection. Every id a connection issued
  (``ConnectionIdIssued``/``ConnectionIdRetired``) is tracked, plus a server connection's
  original destination id, which the client keeps using until it learns ours.
* An Initial packet (supported version, datagram >= 1200 bytes) for an unknown id starts a new
  server connection, unless ``max_connections`` are live (refused, logged once).
* Anything else is dropped and counted in :attr:`Endpoint.stats`; nothing a peer sends can stop
  the endpoint serving others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio
from aioquic._buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from lattica.errors import ConnectError
from lattica.identity import Identity, PeerId
from lattica.net.config import EndpointConfig
from lattica.net.connection import Connection
from lattica.net.datagram import Address, DatagramSocket
from lattica.net.log_once import LogOnce
from lattica.net.quic_internals import LatticaQuicConnection
from lattica.net.tls_identity import CONNECTION_ID_LENGTH, quic_configuration

logger = logging.getLogger("lattica.net.endpoint")

_QUIC_FIXED_BIT = 0x40
_QUIC_LONG_HEADER_BIT = 0x80
_MIN_INITIAL_DATAGRAM_BYTES = 1200  # RFC 9000 section 14.1
_SHUTDOWN_GRACE_S = 1.0


@dataclass
class EndpointStats:
    """Counters of one endpoint (monotonic; read them, never reset them)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    raw_packets_received: int = 0
    raw_packets_sent: int = 0
    malformed_dropped: int = 0
    """Datagrams that did not parse as QUIC (or an Initial in a too-small datagram)."""
    unknown_connection_dropped: int = 0
    """Well-formed QUIC packets for no connection we know."""
    connections_refused: int = 0
    """Inbound connection attempts dropped because ``max_connections`` were live."""
    inbound_connections: int = 0
    outbound_connections: int = 0
    handshakes_failed: int = 0
    """Handshakes that ended without authentication (no certificate, wrong peer, timeout...)."""


class Endpoint:
    """One DatagramSocket carrying many QUIC connections (client and server roles) plus raw
    packets. Use it as ``await nursery.start(endpoint.run)``; it serves until cancelled."""

    def __init__(
        self,
        identity: Identity,
        socket: DatagramSocket,
        config: EndpointConfig = EndpointConfig(),  # noqa: B008 -- frozen, shared safely
    ) -> None:
        self.identity = identity
        self.config = config
        self.stats = EndpointStats()
        self._socket = socket
        self._client_configuration = quic_configuration(identity, is_client=True, config=config)
        self._server_configuration = quic_configuration(identity, is_client=False, config=config)
        self._by_cid: dict[bytes, Connection] = {}
        self._live: set[Connection] = set()
        self._nursery: trio.Nursery | None = None
        self._stopped = False
        self._connection_handler: Callable[[Connection], None] | None = None
        self._raw_packet_handler: Callable[[bytes, Address], None] | None = None
        self._log_once = LogOnce(logger)

    # -- public surface -------------------------------------------------------------------

    @property
    def local_address(self) -> Address:
        """The (host, port) the socket is bound to."""
        return self._socket.local_address

    @property
    def peer_id(self) -> PeerId:
        """This endpoint's own peer id."""
        return self.identity.peer_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; on exit close every connection and the socket."""
        if self._stopped or self._nursery is not None:
            raise RuntimeError("an Endpoint runs once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                task_status.started()
        finally:
            self._stopped = True
            self._nursery = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _SHUTDOWN_GRACE_S
                for connection in list(self._live):
                    await connection._abort(
                        ConnectError("endpoint shut down"), reason="endpoint shutting down"
                    )
            self._socket.close()

    async def connect(
        self,
        address: Address,
        *,
        expected_peer: PeerId | None = None,
        timeout_s: float | None = None,
    ) -> Connection:
        """Dial ``address``; returns once the handshake completed and the peer proved its id.

        Raises :class:`~lattica.errors.ConnectError` (timeout, refused, no certificate, endpoint
        not running) or :class:`~lattica.errors.PeerIdMismatchError` when ``expected_peer`` is
        given and a different key answered (that connection is closed).
        """
        nursery = self._nursery
        if nursery is None:
            raise ConnectError("the endpoint is not running")
        quic = self._new_quic(configuration=self._client_configuration)
        connection = Connection(
            quic=quic,
            owner=self,
            direction="outbound",
            remote_address=address,
            config=self.config,
            expected_peer=expected_peer,
            handshake_timeout_s=timeout_s,
        )
        self._live.add(connection)
        connection._register(quic.host_cid)
        quic.connect(address, now=trio.current_time())
        nursery.start_soon(connection._run_timer)
        try:
            await connection._flush()
            await connection._wait_authenticated()
        except BaseException:
            if not connection._auth_done.is_set():
                with trio.CancelScope(shield=True):
                    await connection._abort(ConnectError("dial cancelled"), reason="cancelled")
            raise
        return connection

    def set_connection_handler(self, handler: Callable[[Connection], None]) -> None:
        """Call ``handler`` synchronously for every new authenticated connection, both
        directions (an outbound one before :meth:`connect` returns it)."""
        self._connection_handler = handler

    def set_raw_packet_handler(self, handler: Callable[[bytes, Address], None]) -> None:
        """Call ``handler(data, source)`` for each non-QUIC datagram (fixed bit clear)."""
        self._raw_packet_handler = handler

    async def send_raw(self, data: bytes, address: Address) -> None:
        """Send one non-QUIC datagram (STUN, hole punching) from the endpoint's socket."""
        if data and data[0] & _QUIC_FIXED_BIT:
            raise ValueError("a raw packet must have the QUIC fixed bit (0x40) clear")
        self.stats.raw_packets_sent += 1
        await self._send_datagrams([(data, address)])

    @property
    def live_connection_count(self) -> int:
        """Connections holding state here, including handshakes in progress and draining ones."""
        return len(self._live)

    def connections(self) -> list[Connection]:
        """Authenticated connections that are not closed."""
        return [c for c in self._live if c._authenticated and not c.is_closed]

    # -- receiving ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                batch = await self._socket.receive_batch()
            except trio.ClosedResourceError:
                return
            now = trio.current_time()
            touched: dict[Connection, None] = {}
            for data, address in batch:
                connection = self._route(data, address, now)
                if connection is not None:
                    touched[connection] = None
            # Events first, for every connection, before anything awaits: a task that runs during
            # a flush must not act on state aioquic already changed (a stream it reset on
            # STOP_SENDING) before we were told.
            for connection in touched:
                connection._process_events()
            # Once per connection per batch: this is what makes the driver fast.
            for connection in touched:
                await connection._flush()

    def _route(self, data: bytes, address: Address, now: float) -> Connection | None:
        stats = self.stats
        stats.datagrams_received += 1
        stats.bytes_received += len(data)
        if not data:
            stats.malformed_dropped += 1
            return None
        if not data[0] & _QUIC_FIXED_BIT:
            stats.raw_packets_received += 1
            self._deliver_raw(data, address)
            return None
        if not data[0] & _QUIC_LONG_HEADER_BIT:
            # Short header (1-RTT, the bulk of the traffic): the destination id is bytes 1..8.
            # Slicing it here saves parsing every header twice (aioquic parses it again).
            if len(data) < 1 + CONNECTION_ID_LENGTH:
                stats.malformed_dropped += 1
                return None
            connection = self._by_cid.get(data[1 : 1 + CONNECTION_ID_LENGTH])
            if connection is None:
                stats.unknown_connection_dropped += 1
                return None
            connection._datagram_received(data, address, now)
            return connection
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            stats.malformed_dropped += 1
            return None
        connection = self._by_cid.get(header.destination_cid)
        if connection is None:
            if (
                header.packet_type != QuicPacketType.INITIAL
                or header.version not in self._server_configuration.supported_versions
            ):
                stats.unknown_connection_dropped += 1
                return None
            if len(data) < _MIN_INITIAL_DATAGRAM_BYTES:
                stats.malformed_dropped += 1
                return None
            if self._nursery is None:
                return None
            if len(self._live) >= self.config.max_connections:
                stats.connections_refused += 1
                self._log_once.warning(
                    "max_connections",
                    "refusing new connections: %d are live (max_connections); "
                    "further refusals are counted, not logged",
                    len(self._live),
                )
                return None
            connection = self._accept(header.destination_cid, address)
        connection._datagram_received(data, address, now)
        return connection

    def _accept(self, original_cid: bytes, address: Address) -> Connection:
        assert self._nursery is not None
        quic = self._new_quic(
            configuration=self._server_configuration,
            original_destination_connection_id=original_cid,
        )
        connection = Connection(
            quic=quic, owner=self, direction="inbound", remote_address=address, config=self.config
        )
        self._live.add(connection)
        connection._register(original_cid)
        connection._register(quic.host_cid)
        self._nursery.start_soon(connection._run_timer)
        return connection

    def _new_quic(self, **kwargs: object) -> LatticaQuicConnection:
        return LatticaQuicConnection(
            max_incoming_streams=self.config.max_incoming_streams,
            stream_receive_window_bytes=self.config.stream_receive_window_bytes,
            **kwargs,
        )

    def _deliver_raw(self, data: bytes, address: Address) -> None:
        handler = self._raw_packet_handler
        if handler is None:
            return
        try:
            handler(data, address)
        except Exception:
            logger.exception("raw packet handler failed on a packet from %s", address)

    # -- ConnectionOwner ------------------------------------------------------------------

    async def _send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        if not datagrams:
            return
        try:
            await self._socket.send_batch(datagrams)
        except (trio.ClosedResourceError, OSError) as exc:
            address = datagrams[0][1]
            self._log_once.warning(("send", type(exc)), "send to %s failed: %r", address, exc)
            return
        self.stats.datagrams_sent += len(datagrams)
        self.stats.bytes_sent += sum(len(data) for data, _ in datagrams)

    def _register_cid(self, cid: bytes, connection: Connection) -> None:
        self._by_cid[cid] = connection

    def _unregister_cid(self, cid: bytes, connection: Connection) -> None:
        if self._by_cid.get(cid) is connection:
            del self._by_cid[cid]

    def _connection_authenticated(self, connection: Connection) -> None:
        if connection.direction == "inbound":
            self.stats.inbound_connections += 1
        else:
            self.stats.outbound_connections += 1
        handler = self._connection_handler
        if handler is None:
            return
        try:
            handler(connection)
        except Exception:
            logger.exception("connection handler failed for %r", connection)

    def _connection_terminated(self, connection: Connection) -> None:
        self._live.discard(connection)

    def _handshake_failed(self, connection: Connection, reason: str) -> None:
        self.stats.handshakes_failed += 1
        logger.info("handshake with %s failed: %s", connection.remote_address, reason)

