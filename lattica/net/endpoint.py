"""One datagram socket carrying many QUIC connections, in both roles, plus raw packets.

Demultiplexing rules:

* A datagram whose first byte has the QUIC fixed bit (0x40) clear is not QUIC (STUN starts with
  0x00/0x01): it goes to the raw packet handler.
* Otherwise the destination connection id picks the connection. Every id a connection issued
  (``ConnectionIdIssued``/``ConnectionIdRetired``) is tracked, plus a server connection's
  original destination id, which the client keeps using until it learns ours.
* An Initial packet (supported version, datagram >= 1200 bytes) for an unknown id starts a new
  server connection, unless ``max_connections`` are live (refused, logged once).
* A long-header packet of a version we do not speak gets a Version Negotiation packet if its
  datagram is >= 1200 bytes (RFC 9000 sections 5.2.2, 6.1), else nothing.
* A short-header packet for an unknown id that carries our tag (an id this node issued before
  a restart) gets a Stateless Reset (RFC 9000 section 10.3, :mod:`lattica.net.stateless_reset`);
  the reset is shorter than the packet and rate-limited (100 per second, one per second to any
  one address), and none goes down a relay circuit.
* Anything else is dropped unanswered and counted in :attr:`Endpoint.stats` (nothing a stranger
  sends makes us send more than it did; RFC 9000 section 8.1). Nothing a peer sends can stop
  the endpoint serving others.

Relay circuits are virtual paths (:mod:`lattica.net.relayed_path`): a circuit registers a send
function with :meth:`Endpoint.open_virtual_path` and delivers what arrives with
:meth:`Endpoint.receive_virtual`; those datagrams take the same connection-id routing (an
Initial on a virtual path starts a server connection on it). Non-QUIC datagrams on a virtual
path are dropped (STUN and hole punching speak to the socket only). Closing the path
(:meth:`Endpoint.close_virtual_path`) ends the connections on it.

Failures: an address the socket layer refuses ends the one connection that uses it
(:class:`~lattica.net.connection.PathSendError`); a socket that fails for good ends
:meth:`Endpoint.run` with :class:`EndpointSocketError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import cast

import trio
from aioquic.buffer import Buffer
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from lattica.errors import ConnectError, LatticaError, LocalProtocolError
from lattica.identity import Identity, PeerId
from lattica.key_counts import add_one, remove_one
from lattica.net.address import InvalidAddressError, address_group, network_address
from lattica.net.config import EndpointConfig
from lattica.net.connection import Connection, PathSendError
from lattica.net.connection_state import ConnectionState
from lattica.net.datagram import Address, DatagramSocket
from lattica.net.log_once import LogOnce
from lattica.net.quic_internals import LatticaQuicConnection
from lattica.net.relayed_path import Path, RelayedPath, VirtualPathSend
from lattica.net.stateless_reset import (
    CID_TAG_BYTES,
    MIN_RESET_BYTES,
    MIN_TRIGGER_BYTES,
    TOKEN_BYTES,
    ResetLimiter,
    build_stateless_reset,
    is_our_connection_id,
    is_stateless_reset,
    reset_key,
    reset_token,
    tagged_connection_id,
)
from lattica.net.tls_identity import CONNECTION_ID_LENGTH, quic_configuration

logger = logging.getLogger("lattica.net.endpoint")

_QUIC_FIXED_BIT = 0x40
_QUIC_LONG_HEADER_BIT = 0x80
_MIN_INITIAL_DATAGRAM_BYTES = 1200  # RFC 9000 section 14.1
_MAX_CONNECTIONS_PER_CIRCUIT = 2
"""Inbound connections one relay circuit may carry at once (an honest one carries one)."""
_MAX_CID_BYTES = 20  # RFC 9000 section 17.2
_SHUTDOWN_GRACE_S = 1.0
# Stateless Resets per second at most (and as a burst): a restart answers each peer's next
# packet once; more than this is a flood of junk, which gets nothing.
_RESETS_PER_S = 100
# How long the token of a connection a reset ended still marks the peer's further resets, and
# how many such tokens are kept at most.
_SPENT_TOKEN_S = 10.0
_MAX_SPENT_TOKENS = 1024


class EndpointSocketError(LatticaError):
    """The endpoint's socket failed for good (not a per-datagram error): the node cannot
    receive any more and must stop."""


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
    retries_sent: int = 0
    """Initials answered with a Retry (their address not yet proven) while under load."""
    connections_refused: int = 0
    """Inbound connection attempts dropped because ``max_connections`` were live, or
    ``max_handshakes_per_address`` handshakes from the same address were in progress."""
    inbound_connections: int = 0
    outbound_connections: int = 0
    handshakes_failed: int = 0
    """Handshakes that ended without authentication (no certificate, wrong peer, timeout...)."""
    stateless_resets_sent: int = 0
    """Stateless Resets sent for short-header packets of connections we do not know."""
    stateless_resets_received: int = 0
    """Connections ended by their peer's Stateless Reset (it had restarted)."""
    stateless_resets_limited: int = 0
    """Of those packets, the ones left unanswered because the reset rate limit was reached."""
    version_negotiations_sent: int = 0
    """Version Negotiation packets sent for Initial-sized packets of versions we do not speak."""
    path_send_failures: int = 0
    """Connections ended because the socket layer refused their peer's address."""
    virtual_datagrams_received: int = 0
    """Datagrams delivered by relay circuits (also counted in ``datagrams_received``)."""
    virtual_datagrams_sent: int = 0
    """Datagrams handed to relay circuits (not counted in ``datagrams_sent``)."""


class Endpoint:
    """One DatagramSocket carrying many QUIC connections (client and server roles) plus raw
    packets. Use it as ``await nursery.start(endpoint.run)``; it serves until cancelled.

    ``run`` raises :class:`EndpointSocketError` if the socket fails for good."""

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
        self._cids_of: dict[Connection, set[bytes]] = {}
        # Inbound connections not yet authenticated, by source address group, and all inbound
        # connections by address group or relay circuit (see _admit_inbound).
        self._handshaking: dict[Connection, str] = {}
        self._handshaking_from: dict[str, int] = {}
        self._inbound_key: dict[Connection, Hashable] = {}
        self._retry_tokens: QuicRetryTokenHandler | None = None  # made at the first Retry
        self._inbound_from: dict[Hashable, int] = {}
        self._nursery: trio.Nursery | None = None
        self._stopped = False
        self._connection_handler: Callable[[Connection], None] | None = None
        self._raw_packet_handler: Callable[[bytes, Address], None] | None = None
        self._log_once = LogOnce(logger)
        self._carrier = _EndpointCarrier(self)
        self._virtual_paths: dict[RelayedPath, VirtualPathSend] = {}
        self._replies: list[tuple[bytes, Address]] = []
        """Stateless answers (Version Negotiation, Stateless Reset) to send after the current
        receive batch."""
        self._reset_key = reset_key(identity.seed)
        # The peer's token of each connection's id in use: a datagram for no id we know that
        # ends with one is that peer's Stateless Reset (its bytes where an id would be are random).
        self._by_reset_token: dict[bytes, Connection] = {}
        self._reset_token_of: dict[Connection, bytes] = {}
        # Tokens of connections a reset ended, until when: the peer answered every packet of
        # ours in flight with a reset, and the later ones are dropped silently, not answered
        # with a reset of our own (a shrinking ping-pong, RFC 9000 section 10.3.3).
        self._spent_reset_tokens: dict[bytes, float] = {}
        self._reset_limiter = ResetLimiter(rate_per_s=_RESETS_PER_S, burst=_RESETS_PER_S)

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
        """Serve until cancelled; on exit close every connection and the socket.

        Raises :class:`EndpointSocketError` when the socket fails for good (the node must stop:
        without a socket it would only look alive)."""
        if self._stopped or self._nursery is not None:
            raise RuntimeError("an Endpoint runs once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                task_status.started()
        except BaseExceptionGroup as group:
            # Surface the socket failure itself, not a group around it, so the node's error
            # names it in one line.
            matched, rest = group.split(EndpointSocketError)
            if matched is not None and rest is None:
                raise matched.exceptions[0] from None
            raise
        finally:
            self._stopped = True
            self._nursery = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _SHUTDOWN_GRACE_S
                for connection in list(self._cids_of):
                    await connection.abort("endpoint shutting down")
            self._socket.close()

    async def connect(
        self,
        address: Path,
        *,
        expected_peer: PeerId | None = None,
        timeout_s: float | None = None,
    ) -> Connection:
        """Dial ``address`` (or an open virtual path); returns once the handshake completed and
        the peer proved its id.

        Raises :class:`~lattica.errors.ConnectError` (timeout, refused, no certificate, an
        address the network refuses, endpoint not running) or
        :class:`~lattica.errors.PeerIdMismatchError` when ``expected_peer`` is given and a
        different key answered (that connection is closed).
        """
        nursery = self._nursery
        if nursery is None:
            raise ConnectError("the endpoint is not running")
        if isinstance(address, RelayedPath):
            if address not in self._virtual_paths:
                raise ConnectError(f"cannot dial {address!r:.200}: the circuit is not open")
        else:
            try:
                # Only IP literals reach the socket: a name would be resolved synchronously by
                # sendto, and a host the kernel refuses would only show as a handshake timeout.
                address = network_address(*address)
            except (InvalidAddressError, TypeError, ValueError) as exc:
                raise ConnectError(f"cannot dial {address!r:.100}: the address is refused: {exc}") from None
        quic = self._new_quic(configuration=self._client_configuration)
        state = ConnectionState(
            quic,
            direction="outbound",
            path=address,
            now=trio.current_time(),
            config=self.config,
            expected_peer=expected_peer,
            handshake_timeout_s=timeout_s,
        )
        connection = Connection(state, self._carrier)
        self._cids_of[connection] = set()
        self._carrier.connection_id_issued(state.host_connection_id, connection)
        nursery.start_soon(connection.run_timer)
        try:
            connection.start_dial(trio.current_time())
            await connection.transmit()
            await connection.wait_authenticated()
        except BaseException:
            if not connection.is_authenticated:
                with trio.CancelScope(shield=True):
                    await connection.abort("dial cancelled")
            raise
        return connection

    def set_connection_handler(self, handler: Callable[[Connection], None]) -> None:
        """Call ``handler`` synchronously for every new authenticated connection, both
        directions (an outbound one before :meth:`connect` returns it). It must not block;
        an exception it raises is a bug and propagates (it is not logged and swallowed)."""
        self._connection_handler = handler

    def set_raw_packet_handler(self, handler: Callable[[bytes, Address], None]) -> None:
        """Call ``handler(data, source)`` for each non-QUIC datagram (fixed bit clear). The
        handler must treat bad input as data (typed errors caught inside it); an exception it
        raises is a bug and propagates."""
        self._raw_packet_handler = handler

    async def send_raw(self, data: bytes, address: Address) -> None:
        """Send one non-QUIC datagram (STUN, hole punching) from the endpoint's socket.

        Raises ``ValueError`` if ``data`` looks like QUIC, :class:`ConnectError` if the socket
        layer refuses ``address``."""
        if data and data[0] & _QUIC_FIXED_BIT:
            raise ValueError("a raw packet must have the QUIC fixed bit (0x40) clear")
        self.stats.raw_packets_sent += 1
        try:
            await self._send([(data, address)])
        except PathSendError as exc:
            raise ConnectError(f"cannot send to {address!r}: {exc}") from exc

    def open_virtual_path(self, path: RelayedPath, send: VirtualPathSend) -> None:
        """Carry datagrams for ``path`` with ``send`` (non-blocking, see
        :mod:`lattica.net.relayed_path`) until :meth:`close_virtual_path`.

        Raises :class:`LocalProtocolError` if ``path`` is already open."""
        if path in self._virtual_paths:
            raise LocalProtocolError(f"virtual path {path!r} is already open")
        self._virtual_paths[path] = send

    async def close_virtual_path(self, path: RelayedPath, reason: str = "relay circuit closed") -> None:
        """Stop carrying ``path`` and end every connection on it (their peers learn it from their
        own idle timeout or circuit end). Idempotent."""
        self._virtual_paths.pop(path, None)
        for connection in [c for c in self._cids_of if c.path == path]:
            await connection.abort(reason)

    async def receive_virtual(self, path: RelayedPath, datagrams: Sequence[bytes]) -> None:
        """Route datagrams a circuit delivered as if they had arrived on the socket from ``path``.
        Datagrams for a path that is not open, and non-QUIC datagrams, are dropped."""
        if path not in self._virtual_paths:
            return
        quic = []
        for data in datagrams:
            if data and data[0] & _QUIC_FIXED_BIT:
                quic.append((data, path))
            else:
                self.stats.malformed_dropped += 1
        self.stats.virtual_datagrams_received += len(quic)
        await self._process_batch(quic)

    @property
    def live_connection_count(self) -> int:
        """Connections holding state here, including handshakes in progress and draining ones."""
        return len(self._cids_of)

    def connections(self) -> list[Connection]:
        """Authenticated connections that are not closed."""
        return [c for c in self._cids_of if c.is_authenticated and not c.is_closed]

    # -- receiving ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                batch = await self._socket.receive_batch()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                # Per-datagram errors (ICMP reports) are absorbed by the socket; this one is the
                # socket itself. Serving on without it would leave a node that only looks alive.
                message = f"the socket {self.local_address} failed: {exc!r}; the endpoint stops"
                logger.critical(message)
                raise EndpointSocketError(message) from exc
            await self._process_batch(batch)

    async def _process_batch(self, batch: Sequence[tuple[bytes, Path]]) -> None:
        now = trio.current_time()
        touched: dict[Connection, None] = {}
        for data, address in batch:
            connection = self._route(data, address, now)
            if connection is not None:
                touched[connection] = None
        # Events first, for every connection, before anything awaits: a task that runs during
        # a transmit must not act on state aioquic already changed (a stream it reset on
        # STOP_SENDING) before we were told.
        for connection in touched:
            connection.handle_events()
        # Once per connection per batch: this is what makes the driver fast.
        for connection in touched:
            await connection.transmit()
            # After the transmit: a server moves off a client's first id as it sends.
            self._track_reset_token(connection)
        if self._replies:
            await self._send_replies()

    def _route(self, data: bytes, address: Path, now: float) -> Connection | None:
        stats = self.stats
        stats.datagrams_received += 1
        stats.bytes_received += len(data)
        if not data:
            stats.malformed_dropped += 1
            return None
        if not data[0] & _QUIC_FIXED_BIT:
            stats.raw_packets_received += 1
            handler = self._raw_packet_handler
            if handler is not None and not isinstance(address, RelayedPath):
                handler(data, address)
            return None
        if not data[0] & _QUIC_LONG_HEADER_BIT:
            # Short header (1-RTT, the bulk of the traffic): the destination id is bytes 1..8.
            # Slicing it here saves parsing every header twice (aioquic parses it again).
            if len(data) < 1 + CONNECTION_ID_LENGTH:
                stats.malformed_dropped += 1
                return None
            connection = self._by_cid.get(data[1 : 1 + CONNECTION_ID_LENGTH])
            if connection is None:
                return self._unknown_short_header(data, address, now)
            connection.receive_datagram(data, address, now)
            return connection
        supported = self._server_configuration.supported_versions
        version = int.from_bytes(data[1:5]) if len(data) >= 5 else None
        if version is not None and version != 0 and version not in supported:
            if not isinstance(address, RelayedPath):
                self._answer_unsupported_version(data, address)
            return None
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            stats.malformed_dropped += 1
            return None
        connection = self._by_cid.get(header.destination_cid)
        if connection is None:
            if header.packet_type != QuicPacketType.INITIAL:
                stats.unknown_connection_dropped += 1
                return None
            if len(data) < _MIN_INITIAL_DATAGRAM_BYTES:
                stats.malformed_dropped += 1
                return None
            if self._nursery is None:
                return None
            if len(self._cids_of) >= self.config.max_connections:
                stats.connections_refused += 1
                self._log_once.warning(
                    "max_connections",
                    "refusing new connections: %d are live (max_connections); "
                    "further refusals are counted, not logged",
                    len(self._cids_of),
                )
                return None
            original_cid, retry_cid = header.destination_cid, None
            if not isinstance(address, RelayedPath) and (header.token or self._under_load()):
                validated = self._address_validated(header, address, now)
                if validated is None:
                    return None  # a Retry was sent, or the token was not ours
                original_cid, retry_cid = validated, header.destination_cid
            connection = self._admit_inbound(original_cid, address, now, retry_cid=retry_cid)
            if connection is None:
                stats.connections_refused += 1
                return None
        connection.receive_datagram(data, address, now)
        return connection

    def _under_load(self) -> bool:
        """Whether new Initials must prove their address first (RFC 9000 section 8.1.2): once
        ``retry_above_handshakes`` inbound handshakes are in progress, so Initials from spoofed
        sources (which no per-address cap bounds) cannot fill ``max_connections``."""
        return len(self._handshaking) >= self.config.retry_above_handshakes

    def _address_validated(self, header: QuicHeader, address: Address, now: float) -> bytes | None:
        """The original destination connection id of an Initial whose Retry token is valid for
        ``address``; None after answering a token-less Initial with a Retry packet (smaller than
        the Initial: no amplification) or dropping one whose token is not ours, expired, or for
        another address."""
        if self._retry_tokens is None:
            self._retry_tokens = QuicRetryTokenHandler()
        if not header.token:
            if header.version is None:
                return None
            retry_cid = os.urandom(CONNECTION_ID_LENGTH)
            token = self._retry_tokens.create_token(
                address=address,
                original_destination_connection_id=header.destination_cid,
                retry_source_connection_id=retry_cid,
                now=now,
            )
            packet = encode_quic_retry(
                version=header.version,
                source_cid=retry_cid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=token,
            )
            self.stats.retries_sent += 1
            self._replies.append((packet, address))
            return None
        try:
            return self._retry_tokens.validate_token(
                address=address, destination_cid=header.destination_cid, token=header.token, now=now
            )
        except (ValueError, IndexError):  # garbage, another node's or an expired token
            self.stats.malformed_dropped += 1
            return None

    def _admit_inbound(
        self, original_cid: bytes, address: Path, now: float, *, retry_cid: bytes | None = None
    ) -> Connection | None:
        """A new inbound connection for an Initial from ``address``, or None when its source
        holds its share: ``max_handshakes_per_address`` half-open and
        ``max_connections_per_address`` in all per address group, or
        :data:`_MAX_CONNECTIONS_PER_CIRCUIT` per relay circuit (one circuit carried any number
        of Initials: review finding)."""
        group: str | None = None
        key: Hashable
        if isinstance(address, RelayedPath):
            key, cap = ("circuit", address), _MAX_CONNECTIONS_PER_CIRCUIT
        else:
            group = address_group(address[0], ipv6_prefix_bits=64)
            key, cap = group, self.config.max_connections_per_address
            if self._handshaking_from.get(group, 0) >= self.config.max_handshakes_per_address:
                return None
        if self._inbound_from.get(key, 0) >= cap:
            return None
        connection = self._accept(original_cid, address, now, retry_cid=retry_cid)
        self._inbound_key[connection] = key
        add_one(self._inbound_from, key)
        if group is not None:
            self._handshaking[connection] = group
            add_one(self._handshaking_from, group)
        return connection

    def _handshake_over(self, connection: Connection) -> None:
        """``connection`` authenticated or ended: it no longer counts as half-open."""
        group = self._handshaking.pop(connection, None)
        if group is not None:
            remove_one(self._handshaking_from, group)

    def _track_reset_token(self, connection: Connection) -> None:
        """Keep :attr:`_by_reset_token` at the token of ``connection``'s peer id in use (it
        changes when the handshake gives one or the peer's id is rotated)."""
        token = connection.peer_reset_token
        old = self._reset_token_of.get(connection)
        if token == old:
            return
        if old is not None and self._by_reset_token.get(old) is connection:
            del self._by_reset_token[old]
        if token is None:
            self._reset_token_of.pop(connection, None)
        else:
            self._reset_token_of[connection] = token
            self._by_reset_token[token] = connection

    def _unknown_short_header(self, data: bytes, address: Path, now: float) -> Connection | None:
        """A short-header datagram for no id we know: a peer's Stateless Reset of one of our
        connections (RFC 9000 section 10.3.1: its last 16 bytes are the token the peer gave for
        the id our packets carry; that connection is ended and returned), a further reset of a
        connection already ended that way (dropped: its token is remembered for
        :data:`_SPENT_TOKEN_S`, so it is not answered with a reset of ours, a shrinking
        ping-pong, section 10.3.3), or a packet for a connection we lost (answered with our own
        reset). The dictionary finds a candidate by a keyed hash of the last 16 bytes (no timing
        signal about a token a stranger does not hold); a match is confirmed in constant time."""
        if len(data) >= MIN_RESET_BYTES:
            tail = data[-TOKEN_BYTES:]
            connection = self._by_reset_token.get(tail)
            token = None if connection is None else connection.peer_reset_token
            # From where the connection's datagrams go (RFC 9000 section 10.3.1 ties tokens to
            # the addresses we sent to): one that learnt a token must at least spoof the peer.
            if (
                connection is not None
                and token is not None
                and address == connection.current_path
                and is_stateless_reset(data, token)
            ):
                self.stats.stateless_resets_received += 1
                if len(self._spent_reset_tokens) >= _MAX_SPENT_TOKENS:
                    self._spent_reset_tokens = {t: u for t, u in self._spent_reset_tokens.items() if u > now}
                if len(self._spent_reset_tokens) < _MAX_SPENT_TOKENS:
                    self._spent_reset_tokens[token] = now + _SPENT_TOKEN_S
                connection.stateless_reset()
                return connection
            spent_until = self._spent_reset_tokens.get(tail)
            if spent_until is not None and now < spent_until:
                self.stats.unknown_connection_dropped += 1
                return None
        self.stats.unknown_connection_dropped += 1
        if not isinstance(address, RelayedPath):
            self._answer_unknown_connection(data, address, now)
        return None

    def _answer_unknown_connection(self, data: bytes, address: Address, now: float) -> None:
        """RFC 9000 section 10.3: a short-header packet for an id we do not know (ours before a
        restart, most likely) gets a Stateless Reset with that id's token, shorter than the
        packet (never an amplifier, never a loop with another reset) and within the rate limit."""
        if len(data) < MIN_TRIGGER_BYTES:
            return  # no reset can be shorter than it
        if address == self._socket.local_address:
            return  # "from" ourselves: forged, and a reset to it would come back to us
        destination_cid = data[1 : 1 + CONNECTION_ID_LENGTH]
        if not is_our_connection_id(self._reset_key, destination_cid):
            return  # never ours (junk, a guess): it costs nothing of the budget
        if not self._reset_limiter.allow(now, address):
            self.stats.stateless_resets_limited += 1
            return
        reset = build_stateless_reset(reset_token(self._reset_key, destination_cid), len(data))
        assert reset is not None  # long enough, checked above
        self.stats.stateless_resets_sent += 1
        self._replies.append((reset, address))

    def _answer_unsupported_version(self, data: bytes, address: Address) -> None:
        """RFC 9000 sections 5.2.2 and 6.1: a long-header packet of a version we do not speak
        gets a Version Negotiation packet only if its datagram is large enough to start a
        connection (>= 1200 bytes); the answer is far smaller than that, so it never amplifies.
        Anything smaller is dropped unanswered."""
        stats = self.stats
        parsed = _invariant_long_header(data)
        if parsed is None or len(data) < _MIN_INITIAL_DATAGRAM_BYTES:
            stats.malformed_dropped += 1
            return
        destination_cid, source_cid = parsed
        packet = encode_quic_version_negotiation(
            source_cid=destination_cid,
            destination_cid=source_cid,
            supported_versions=list(self._server_configuration.supported_versions),
        )
        stats.version_negotiations_sent += 1
        # Sent by the receive loop after this batch: no task per packet, bounded by the batch.
        self._replies.append((packet, address))

    def _accept(
        self, original_cid: bytes, address: Path, now: float, *, retry_cid: bytes | None = None
    ) -> Connection:
        assert self._nursery is not None
        quic = self._new_quic(
            configuration=self._server_configuration,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_cid,
        )
        state = ConnectionState(quic, direction="inbound", path=address, now=now, config=self.config)
        connection = Connection(state, self._carrier)
        self._cids_of[connection] = set()
        self._carrier.connection_id_issued(original_cid, connection)
        if retry_cid is not None:  # the client sends to the Retry's id until it learns ours
            self._carrier.connection_id_issued(retry_cid, connection)
        self._carrier.connection_id_issued(state.host_connection_id, connection)
        self._nursery.start_soon(connection.run_timer)
        return connection

    def _new_quic(self, **kwargs: object) -> LatticaQuicConnection:
        return LatticaQuicConnection(
            max_incoming_streams=self.config.max_incoming_streams,
            stream_receive_window_bytes=self.config.stream_receive_window_bytes,
            reset_token_for=self._reset_token_for,
            connection_id_for=self._connection_id_for,
            **kwargs,
        )

    def _connection_id_for(self, random_id: bytes) -> bytes:
        return tagged_connection_id(self._reset_key, random_id[:-CID_TAG_BYTES])

    def _reset_token_for(self, connection_id: bytes) -> bytes:
        return reset_token(self._reset_key, connection_id)

    # -- sending --------------------------------------------------------------------------

    async def _send(self, datagrams: Sequence[tuple[bytes, Path]]) -> None:
        """Send one connection's datagrams. Raises :class:`PathSendError` when the socket layer
        refuses their address (``sendto`` raises ``TypeError``/``ValueError`` for a host with a
        NUL byte, ``OSError`` for an address family it cannot reach); a closed socket (we are
        shutting down) drops them. Datagrams for a virtual path go to its circuit (dropped if
        the circuit is gone: its connection ends when the circuit closes)."""
        if not datagrams:
            return
        if any(type(path) is RelayedPath for _, path in datagrams):
            direct: list[tuple[bytes, Address]] = []
            for data, path in datagrams:
                if isinstance(path, RelayedPath):
                    send = self._virtual_paths.get(path)
                    if send is not None:
                        send(data)
                        self.stats.virtual_datagrams_sent += 1
                else:
                    direct.append((data, path))
            if not direct:
                await trio.lowlevel.checkpoint()
                return
            await self._send_direct(direct)
            return
        await self._send_direct(cast("Sequence[tuple[bytes, Address]]", datagrams))

    async def _send_direct(self, datagrams: Sequence[tuple[bytes, Address]]) -> None:
        try:
            await self._socket.send_batch(datagrams)
        except trio.ClosedResourceError:
            return
        except (OSError, TypeError, ValueError, UnicodeError) as exc:
            address = datagrams[0][1]
            self._log_once.warning(("send", type(exc)), "send to %r failed: %r", address, exc)
            raise PathSendError(repr(exc)) from exc
        self.stats.datagrams_sent += len(datagrams)
        self.stats.bytes_sent += sum(len(data) for data, _ in datagrams)

    async def _send_replies(self) -> None:
        replies, self._replies = self._replies, []
        for reply in replies:
            # An answer to a stranger: a refused address was logged once by _send, nothing more.
            with contextlib.suppress(PathSendError):
                await self._send([reply])


class _EndpointCarrier:
    """The endpoint as its connections see it (:class:`~lattica.net.connection.ConnectionCarrier`)."""

    __slots__ = ("_endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint

    async def send_datagrams(self, datagrams: list[tuple[bytes, Path]]) -> None:
        try:
            await self._endpoint._send(datagrams)
        except PathSendError:
            self._endpoint.stats.path_send_failures += 1
            raise

    def connection_id_issued(self, connection_id: bytes, connection: Connection) -> None:
        endpoint = self._endpoint
        cids = endpoint._cids_of.get(connection)
        if cids is None:
            return  # already terminated
        cids.add(connection_id)
        endpoint._by_cid[connection_id] = connection

    def connection_id_retired(self, connection_id: bytes, connection: Connection) -> None:
        endpoint = self._endpoint
        cids = endpoint._cids_of.get(connection)
        if cids is not None:
            cids.discard(connection_id)
        if endpoint._by_cid.get(connection_id) is connection:
            del endpoint._by_cid[connection_id]

    def connection_authenticated(self, connection: Connection) -> None:
        endpoint = self._endpoint
        endpoint._handshake_over(connection)
        if connection.direction == "inbound":
            endpoint.stats.inbound_connections += 1
        else:
            endpoint.stats.outbound_connections += 1
        handler = endpoint._connection_handler
        if handler is not None:
            handler(connection)

    def handshake_failed(self, connection: Connection, reason: str) -> None:
        self._endpoint.stats.handshakes_failed += 1
        # An inbound handshake is started by one unauthenticated (spoofable) datagram: a line per
        # failure would let anyone write our log. Counted in stats; shown at debug level.
        level = logging.INFO if connection.direction == "outbound" else logging.DEBUG
        logger.log(level, "handshake with %s failed: %s", connection.remote_address, reason)

    def connection_terminated(self, connection: Connection) -> None:
        endpoint = self._endpoint
        endpoint._handshake_over(connection)
        key = endpoint._inbound_key.pop(connection, None)
        if key is not None:
            remove_one(endpoint._inbound_from, key)
        token = endpoint._reset_token_of.pop(connection, None)
        if token is not None and endpoint._by_reset_token.get(token) is connection:
            del endpoint._by_reset_token[token]
        for cid in endpoint._cids_of.pop(connection, ()):
            if endpoint._by_cid.get(cid) is connection:
                del endpoint._by_cid[cid]


def _invariant_long_header(data: bytes) -> tuple[bytes, bytes] | None:
    """(destination id, source id) of a long-header packet, read with the version-independent
    layout of RFC 8999 section 5.1, or None if it does not parse."""
    if len(data) < 7:
        return None
    dcid_length = data[5]
    if dcid_length > _MAX_CID_BYTES or len(data) < 7 + dcid_length:
        return None
    destination_cid = data[6 : 6 + dcid_length]
    scid_length = data[6 + dcid_length]
    start = 7 + dcid_length
    if scid_length > _MAX_CID_BYTES or len(data) < start + scid_length:
        return None
    return destination_cid, data[start : start + scid_length]
