"""``Node``: the services of one Lattica peer composed in one trio nursery.

A node owns exactly one :class:`~lattica.net.datagram.DatagramSocket` (a kernel UDP socket or a
``sim_net`` socket: the node cannot tell) and runs, in order of start-up, the QUIC endpoint, the
connection manager, the RPC layer and the services built on RPC. Leaving the ``async with``
block cancels them all and closes the socket.

    async with Node(identity, socket, NodeConfig()) as node:
        await node.connect(PeerAddr.parse("PEERID@127.0.0.1:4001"))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self

import trio

from lattica import __version__
from lattica.config import NodeConfig
from lattica.identity import Identity, PeerId
from lattica.net import Connection, ConnectionManager, Endpoint, EndpointConfig, Rpc
from lattica.net.address import PeerAddr, format_host_port
from lattica.net.datagram import Address, DatagramSocket
from lattica.net.interfaces import dialable_hosts

log = logging.getLogger("lattica.node")


class Node:
    """One Lattica peer. Use as an async context manager; everything stops on exit."""

    def __init__(
        self,
        identity: Identity,
        socket: DatagramSocket,
        config: NodeConfig | None = None,
        *,
        advertise_hosts: Sequence[str] | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or NodeConfig()
        self.socket = socket
        self.endpoint = Endpoint(
            identity,
            socket,
            EndpointConfig(
                idle_timeout_s=self.config.idle_timeout_s,
                keepalive_interval_s=self.config.keepalive_interval_s,
                handshake_timeout_s=self.config.handshake_timeout_s,
                max_connections=self.config.max_connections,
                max_incoming_streams=self.config.max_incoming_streams,
            ),
        )
        self.connections = ConnectionManager(self.endpoint)
        self.rpc = Rpc(self.connections)
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
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            await nursery.start(self.endpoint.run)
            await nursery.start(self.connections.run)
            self._nursery = nursery
            self.started_at = trio.current_time()
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        log.info("node %s started on %s (version %s)", self.peer_id, self.dial_strings(), __version__)
        for entry in self.config.bootstrap:
            nursery.start_soon(self._bootstrap_one, entry)
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

    async def _bootstrap_one(self, entry: str) -> None:
        try:
            await self.connect(PeerAddr.parse(entry))
        except Exception as exc:  # one unreachable bootstrap peer must not stop the node
            log.warning("bootstrap peer %s unreachable: %s", entry, exc)

    async def connect(self, peer: PeerAddr | PeerId, *, timeout_s: float | None = None) -> Connection:
        """A connection to ``peer``, reusing an open one; see :class:`ConnectionManager`."""
        return await self.connections.connect(peer, timeout_s=timeout_s)

    async def ping(self, peer: PeerAddr | PeerId) -> float:
        """One round trip of the ping protocol; the RTT in seconds."""
        return await self.rpc.ping(peer)

    def uptime_s(self) -> float:
        """Seconds since start (trio's clock, so virtual time under sim_net)."""
        return 0.0 if self.started_at is None else trio.current_time() - self.started_at
