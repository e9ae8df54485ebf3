"""``Node``: the services of one Lattica peer composed in one trio nursery.

A node owns exactly one :class:`~lattica.net.datagram.DatagramSocket` (a kernel UDP socket or a
``sim_net`` socket: the node cannot tell) and runs, in order of start-up, the QUIC endpoint, the
STUN responder (``node.nat``), the connection manager, the RPC layer and the services built on
RPC (the DHT, and replicated spaces as ``node.crdt``). Leaving the ``async with`` block
cancels them all and closes the socket.

    async with Node(identity, socket, NodeConfig()) as node:
        await node.connect(PeerAddr.parse("PEERID@127.0.0.1:4001"))
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

from lattica import __version__
from lattica.config import NodeConfig
from lattica.content.exchange_service import ContentService
from lattica.crdt import CrdtService, SpaceStore
from lattica.dht import BootstrapError, Dht, DhtStore
from lattica.dht.messages import PROTOCOL_ID as DHT_PROTOCOL_ID
from lattica.errors import ConnectError, DialSelfError, LatticaError, RpcError
from lattica.identity import Identity, PeerId
from lattica.nat import NatService
from lattica.nat.autonat import ReachabilityStatus
from lattica.nat.autonat_service import DialBackSocketFactory, ReachabilityService
from lattica.nat.hole_punch_service import HolePunchService
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_client import RelayClient
from lattica.nat.relay_messages import HOP_PROTOCOL
from lattica.nat.relay_record import (
    RELAYED_ADDRESSES_KEY,
    RelayRecordDecodeError,
    decode_relayed_addresses,
    encode_relayed_addresses,
)
from lattica.nat.relay_service import RelayService
from lattica.net import Connection, ConnectionManager, ConnectReport, Endpoint, EndpointSocketError, Rpc
from lattica.net.address import PeerAddr, format_host_port
from lattica.net.bulk_path import BulkPath
from lattica.net.datagram import Address, DatagramSocket
from lattica.net.interfaces import dialable_hosts
from lattica.net.tcp_transport import TcpTransport

log = logging.getLogger("lattica.node")

RELAYED_RECORD_RETRY_S = 60.0
"""How soon a failed publication of our relayed addresses is tried again (seconds)."""

MAX_DISCOVERED_RELAYS = 8
"""Most relays a private node picks up from its connected peers (see ``Node._find_relays``)."""


@dataclass(frozen=True, slots=True)
class PingResult:
    """What :meth:`Node.ping` measured, and over which connection."""

    peer_id: PeerId
    """Who answered (proved in the handshake)."""
    rtt_s: float
    """Round trip of the echo alone, in seconds of ``trio.current_time()``."""
    remote_address: Address
    """The peer's address on the connection that carried the echo."""
    reused_connection: bool
    """True if an open connection was used; False if this ping dialled (or joined a dial)."""
    connect_s: float
    """Seconds spent getting the connection (0 when reused)."""
    relayed_via: PeerId | None = None
    """The relay that carried the echo, or None over a direct connection."""


class Node:
    """One Lattica peer. Use as an async context manager; everything stops on exit.

    ``config`` is the whole settings tree: ``config.net`` configures the endpoint, connection
    manager and RPC layer, ``config.dht`` the DHT (``config.bootstrap`` is appended to its
    ``bootstrap_peers``), ``config.nat`` identify, observed addresses and reachability
    (``node.reachability``; a node found private runs the DHT in client mode).
    With ``blocks_dir`` the node holds and serves content (``node.content``, its index in
    ``database``). ``dial_back_socket_factory()`` opens a fresh ephemeral UDP socket for AutoNAT dial-backs
    to other nodes (without it the node refuses to dial back). Raises
    :class:`~lattica.config.ConfigError` for a ``bootstrap`` entry that does not parse.
    """

    def __init__(
        self,
        identity: Identity,
        socket: DatagramSocket,
        config: NodeConfig | None = None,
        *,
        advertise_hosts: Sequence[str] | None = None,
        database: Path | None = None,
        blocks_dir: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        dial_back_socket_factory: DialBackSocketFactory | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or NodeConfig()
        self.socket = socket
        net = self.config.net
        self.endpoint = Endpoint(identity, socket, net)
        self.connections = ConnectionManager(self.endpoint, idle_close_s=net.idle_close_s)
        # STUN transaction ids guard observed addresses against off-path forgery: only a test's
        # seeded rng may make them predictable.
        self.nat = NatService(self.endpoint, random_bytes=rng.randbytes if rng else os.urandom)
        self.rpc = Rpc(
            self.connections,
            max_concurrent_inbound_per_peer=net.rpc_max_concurrent_inbound_per_peer,
            max_request_bytes=net.rpc_max_request_bytes,
            max_response_bytes=net.rpc_max_response_bytes,
            header_timeout_s=net.rpc_header_timeout_s,
            request_timeout_s=net.rpc_request_timeout_s,
            max_concurrent_inbound=net.rpc_max_concurrent_inbound,
            max_concurrent_inbound_per_address=net.rpc_max_concurrent_inbound_per_address,
        )
        # TLS-over-TCP: dials work always; it listens only if config.net.tcp_listen asks.
        self.tcp = TcpTransport(
            identity, net, stream_handler=self.rpc.serve_stream, idle_close_s=net.idle_close_s
        )
        # For bulk transfer: `await node.bulk.connection(peer)` is TCP where direct, else QUIC.
        self.bulk = BulkPath(self.connections, self.tcp)
        # Relay service (answers only with nat.relay.service on) and relay client (reservations
        # on nat.relay.relays, circuits to relayed addresses).
        self.relay_service = RelayService(self.rpc, self.config.nat.relay)
        self.relay_client = RelayClient(self.endpoint, self.rpc, self.config.nat.relay)
        self.dht_store = DhtStore(
            database or ":memory:",
            own_key=identity.peer_id.dht_key(),
            max_bytes=self.config.dht.max_store_bytes,
            max_bytes_per_writer=self.config.dht.max_store_bytes_per_writer,
        )
        self.dht = Dht(
            identity,
            self.rpc,
            self.dht_store,
            remember_addresses=self.connections.add_addresses,
            own_addresses=self.listen_addresses,
            config=replace(self.config.dht, bootstrap_peers=self.config.bootstrap_peers()),
            wall_clock=wall_clock,
            rng=rng,
        )
        self.reachability = ReachabilityService(
            self.rpc,
            self.nat,
            self.config.nat,
            own_addresses=self.listen_addresses,
            protocols=self._served_protocols,
            agent_version=f"lattica/{__version__}",
            dial_back_socket_factory=dial_back_socket_factory,
            random_bytes=rng.randbytes if rng else os.urandom,
        )
        self.reachability.add_listener(self._reachability_changed)
        # Relayed connections are upgraded to direct ones when the NATs allow it.
        self.hole_punch = HolePunchService(
            self.rpc,
            self.nat,
            self.reachability.book,
            self.listen_addresses,
            random_bytes=rng.randbytes if rng else os.urandom,
            config=self.config.nat.hole_punch,
        )
        self.reachability.add_address_listener(self.hole_punch.addresses_changed)
        self._discovered_relays: set[PeerId] = set()
        self.reachability.add_listener(lambda _status: self._find_relays())
        self.reachability.add_identify_listener(lambda _peer: self._find_relays())
        self._reachability_changed(self.reachability.status())
        # Replicated spaces share the DHT's sqlite writer: one group commit for lattica.db.
        self.crdt = CrdtService(
            identity,
            self.rpc,
            self.dht,
            SpaceStore(self.dht_store.writer),
            self.config.crdt,
            rng=random.Random(rng.random()) if rng else None,
        )
        # Content needs a place for chunk files: only nodes given one (the daemon: home/blocks)
        # hold and serve content.
        self.content: ContentService | None = (
            None
            if blocks_dir is None
            else ContentService(
                self.rpc,
                self.connections,
                self.dht,
                blocks_dir,
                self.dht_store.writer,
                self.config.content,
                bulk=self.bulk if self.config.net.tcp_listen else None,
            )
        )
        self.joined_dht = trio.Event()
        self.published_relayed_addresses: list[str] = []
        """Relayed addresses last put in the DHT (:mod:`lattica.nat.relay_record`)."""
        self._published = trio.lowlevel.ParkingLot()
        self._advertise_hosts = list(advertise_hosts) if advertise_hosts else None
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self.started_at: float | None = None

    @property
    def peer_id(self) -> PeerId:
        """This node's identity."""
        return self.identity.peer_id

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery the node's services run in (only while started)."""
        if self._nursery is None:
            raise RuntimeError("node is not running")
        return self._nursery

    def _served_protocols(self) -> list[str]:
        # A DHT client does not serve the DHT to strangers, nor a node without the relay service
        # relaying (its HOP handler only refuses): identify leaves them out.
        hidden = {DHT_PROTOCOL_ID} if self.dht.client_mode else set()
        if not self.config.nat.relay.service:
            hidden.add(HOP_PROTOCOL)
        return [p for p in self.rpc.protocols() if p not in hidden]

    def _find_relays(self) -> None:
        """A private node without configured relays reserves on connected peers that serve the
        relay protocol (at most :data:`MAX_DISCOVERED_RELAYS` of them, the client holds
        ``nat.relay.reservations`` at once): that is what makes it reachable through a relay
        without any setup."""
        if self.config.nat.relay.relays or not self.reachability.relay_reservation_wanted:
            return
        for peer, protocols in list(self.reachability.peer_protocols.items()):
            if len(self._discovered_relays) >= MAX_DISCOVERED_RELAYS:
                return
            if HOP_PROTOCOL not in protocols or peer in self._discovered_relays:
                continue
            connection = self.connections.connection(peer)
            # Only an address we dialled is known to work for others too.
            if connection is None or connection.relayed_via is not None or connection.direction != "outbound":
                continue
            self._discovered_relays.add(peer)
            log.info("reserving on relay %s, found among connected peers", peer)
            self.relay_client.add_relay(PeerAddr(connection.remote_address, peer))

    def _reachability_changed(self, status: ReachabilityStatus) -> None:
        # Only a node found private leaves server mode; "unknown" keeps the configured mode, or
        # nodes that cannot tell (one LAN, loopback) would all be clients and the DHT empty.
        self.dht.set_client_mode(self.config.dht.client_mode or status.reachability == "private")

    def listen_addresses(self) -> list[Address]:
        """Addresses peers can dial (wildcard binds expanded to interface addresses)."""
        host, port = self.socket.local_address
        hosts = self._advertise_hosts or dialable_hosts(host)
        return [(h, port) for h in hosts]

    def dial_strings(self) -> list[str]:
        """``PEERID@HOST:PORT`` strings for :meth:`listen_addresses`."""
        return [f"{self.peer_id}@{format_host_port(a)}" for a in self.listen_addresses()]

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            # Registered first so it runs last: the DHT persists its table as it stops.
            stack.callback(self.dht_store.close)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            await nursery.start(self.endpoint.run)
            await nursery.start(self.nat.run)
            await nursery.start(self.connections.run)
            await nursery.start(self.tcp.run)
            if self.config.net.tcp_listen:
                await self._listen_tcp()
            await nursery.start(self.dht.run)
            await nursery.start(self.relay_client.run)
            await nursery.start(self.reachability.run)
            await nursery.start(self.hole_punch.run)
            nursery.start_soon(self._publish_relayed_addresses)
            await nursery.start(self.crdt.run)
            if self.content is not None:
                await nursery.start(self.content.run)
            self._nursery = nursery
            self.started_at = trio.current_time()
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        log.info("node %s started on %s (version %s)", self.peer_id, self.dial_strings(), __version__)
        if self.dht.config.bootstrap_peers:
            nursery.start_soon(self._join_dht)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        self._nursery = None
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, tb)

    async def _listen_tcp(self) -> None:
        host, udp_port = self.socket.local_address
        port = self.config.net.tcp_port or udp_port
        try:
            # "::" is a dual-stack UDP socket; trio binds "::" v6-only, so None = both families.
            await self.tcp.listen(None if host == "::" else host, port)
        except OSError as exc:
            raise EndpointSocketError(
                f"cannot listen for TLS-over-TCP on {format_host_port((host, port))}: "
                f"{exc.strerror or exc}"
            ) from None

    async def _join_dht(self) -> None:
        """Bootstrap until it works: an unreachable bootstrap peer is retried with backoff
        (1 s doubling to 5 min) and reported once per attempt, never fatal."""
        delay_s = 1.0
        while True:
            try:
                answered = await self.dht.bootstrap()
            except BootstrapError as exc:
                log.warning("DHT bootstrap failed (%s); retrying in %.0f s", exc, delay_s)
                await trio.sleep(delay_s)
                delay_s = min(delay_s * 2, 300.0)
                continue
            known = len(self.dht.routing_table)
            log.info("joined the DHT through %d bootstrap peer(s); %d peers known", answered, known)
            self.joined_dht.set()
            return

    async def connect(
        self, peer: PeerAddr | PeerId | RelayedAddr, *, timeout_s: float | None = None
    ) -> Connection:
        """A connection to ``peer``: an explicit address is dialled unless a connection to that
        very address exists; a peer id reuses any connection to it; a relayed address opens a
        circuit through its relay (:meth:`RelayClient.connect`). See
        :meth:`ConnectionManager.connect_and_report`; raises its errors."""
        if isinstance(peer, RelayedAddr):
            return await self.relay_client.connect(peer, timeout_s=timeout_s)
        if isinstance(peer, PeerId):
            return (await self._connect_peer(peer, timeout_s=timeout_s)).connection
        return await self.connections.connect(peer, timeout_s=timeout_s)

    async def ping(self, peer: PeerAddr | PeerId | RelayedAddr, *, timeout_s: float = 10.0) -> PingResult:
        """Reach ``peer`` and time one ``/lattica/ping/1`` echo over the connection used.

        ``PeerAddr``: that address is dialled unless a connection to exactly that address is
        open (the result says which); ``PeerId``: any connection to it (direct preferred),
        else its known addresses, else the DHT's (``find_peer``), else through the relays of its
        relayed-address record (:mod:`lattica.nat.relay_record`); ``RelayedAddr``: a live
        connection to the target through that relay, else a new circuit. ``timeout_s`` bounds
        dial and echo together. Raises :class:`~lattica.errors.ConnectError` (including
        :class:`~lattica.errors.DialSelfError` for this node's own id or address),
        :class:`~lattica.errors.PeerIdMismatchError` or :class:`~lattica.errors.RpcError`.
        """
        deadline = trio.current_time() + timeout_s

        async def connect() -> ConnectReport:
            left_s = max(deadline - trio.current_time(), 0.0)
            if isinstance(peer, RelayedAddr):
                return await self._connect_relayed(peer, timeout_s=left_s)
            if isinstance(peer, PeerId):
                return await self._connect_peer(peer, timeout_s=left_s)
            return await self.connections.connect_and_report(peer, timeout_s=left_s)

        began = trio.current_time()
        report = await connect()
        connect_s = trio.current_time() - began
        try:
            rtt_s = await self.rpc.ping(report.connection, timeout_s=max(deadline - trio.current_time(), 0.0))
        except RpcError as exc:
            reset = isinstance(report.connection, Connection) and report.connection.reset_by_peer
            if not (report.reused and reset and exc.code == "connection-lost"):
                raise
            # The connection we had was reset statelessly: the peer restarted and is there.
            # Dial it afresh, once, within the same timeout.
            began = trio.current_time()
            report = await connect()
            connect_s = trio.current_time() - began
            rtt_s = await self.rpc.ping(report.connection, timeout_s=max(deadline - trio.current_time(), 0.0))
        return PingResult(
            peer_id=report.connection.peer_id,
            rtt_s=rtt_s,
            remote_address=report.connection.remote_address,
            reused_connection=report.reused,
            connect_s=connect_s,
            relayed_via=report.connection.relayed_via,
        )

    async def _connect_relayed(self, peer: RelayedAddr, *, timeout_s: float) -> ConnectReport:
        for connection in reversed(self.connections.connections()):
            if connection.peer_id == peer.target and connection.relayed_via == peer.relay.peer_id:
                await trio.lowlevel.checkpoint()
                return ConnectReport(connection, reused=True)
        return ConnectReport(await self.relay_client.connect(peer, timeout_s=timeout_s), reused=False)

    async def _connect_peer(self, peer: PeerId, *, timeout_s: float | None) -> ConnectReport:
        """A connection to ``peer`` by id: an open one (direct preferred), else its known
        addresses, else where the DHT says it is (``find_peer``), else through the relays its
        relayed-address record names. Raises the first dial's :class:`ConnectError` when no
        route works (or a timeout error after ``timeout_s``)."""
        deadline = trio.current_time() + (math.inf if timeout_s is None else timeout_s)

        def remaining() -> float | None:
            return None if timeout_s is None else max(deadline - trio.current_time(), 0.0)

        def half() -> float | None:
            left = remaining()
            return None if left is None else left / 2

        try:
            # Known addresses get half the time at most, for the same reason as below.
            return await self.connections.connect_and_report(peer, timeout_s=half())
        except ConnectError as exc:
            first_error = exc
        if isinstance(first_error, DialSelfError):
            raise first_error
        with trio.move_on_at(deadline):
            try:
                found = await self.dht.find_peer(peer)
            except LatticaError as exc:
                log.debug("find_peer %s failed: %s", peer, exc)
            else:
                if found.addresses and found.addresses != self.connections.addresses(peer):
                    self.connections.add_addresses(peer, found.addresses)
                    try:
                        # Half the time at most: a NATed peer's public address may well be
                        # filtered, and its relays are still to be tried.
                        return await self.connections.connect_and_report(peer, timeout_s=half())
                    except ConnectError as exc:
                        log.debug("dialling %s at %s failed: %s", peer, found.addresses, exc)
            for relayed in await self._relayed_addresses_of(peer):
                try:
                    connection = await self.relay_client.connect(relayed, timeout_s=remaining())
                except ConnectError as exc:
                    log.debug("dialling %s through %s failed: %s", peer, relayed.relay, exc)
                    continue
                return ConnectReport(connection, reused=False)
        raise first_error

    async def _relayed_addresses_of(self, peer: PeerId) -> list[RelayedAddr]:
        """What ``peer``'s relayed-address record in the DHT says (empty: none, or invalid)."""
        try:
            record = (await self.dht.get(RELAYED_ADDRESSES_KEY, writer=peer)).record
            return [] if record is None else decode_relayed_addresses(record.value, peer)
        except RelayRecordDecodeError as exc:
            log.info("ignoring the relayed-address record of %s: %s", peer, exc)
        except LatticaError as exc:
            log.debug("no relayed-address record of %s: %s", peer, exc)
        return []

    async def _publish_relayed_addresses(self) -> None:
        """Keep our relayed-address record in the DHT in step with our reservations (the DHT
        republishes a record while it lives); a failed put is retried after
        :data:`RELAYED_RECORD_RETRY_S`."""
        while True:
            current = self.relay_client.relayed_addresses()
            if current and current != self.published_relayed_addresses:
                try:
                    value = encode_relayed_addresses([RelayedAddr.parse(a) for a in current])
                    await self.dht.put(RELAYED_ADDRESSES_KEY, value)
                except LatticaError as exc:
                    log.info("could not publish our relayed addresses yet: %s", exc)
                    with trio.move_on_after(RELAYED_RECORD_RETRY_S):
                        await self.relay_client.wait_changed()
                    continue
                self.published_relayed_addresses = current
                self._published.unpark_all()
                log.info("published relayed addresses %s", current)
            await self.relay_client.wait_changed()

    async def wait_relayed_addresses_published(self) -> None:
        """Wait until our relayed-address record is next put in the DHT."""
        await self._published.park()

    def uptime_s(self) -> float:
        """Seconds since start (trio's clock, so virtual time under sim_net)."""
        return 0.0 if self.started_at is None else trio.current_time() - self.started_at
