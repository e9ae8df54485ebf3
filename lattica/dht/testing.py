"""An in-memory :class:`~lattica.dht.transport.RpcTransport` for tests and simulations.

Each node gets a :class:`MemoryTransport` from one :class:`MemoryNetwork`. A request calls the
target's handler directly (after a trio checkpoint), so no sockets or handshakes are involved;
the handler sees the caller's real peer id, as the QUIC transport would guarantee. Peers can be
marked dead (requests to them raise :class:`~lattica.errors.ConnectError`), and requests by
:class:`PeerId` only succeed when the caller's address book knows an address that the target
listens on -- so tests notice when the DHT forgets to tell the transport where a peer lives.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import trio

from lattica.dht.transport import RpcHandler
from lattica.errors import ConnectError, PeerIdMismatchError, RpcError
from lattica.identity import PeerId
from lattica.net.address import PeerAddr
from lattica.net.datagram import Address


@dataclass
class MemoryNetwork:
    """The shared registry of in-memory nodes."""

    nodes: dict[PeerId, MemoryTransport] = field(default_factory=dict)
    listeners: dict[Address, PeerId] = field(default_factory=dict)
    dead: set[PeerId] = field(default_factory=set)
    relayed: set[PeerId] = field(default_factory=set)
    """Peers every node sees as reached through a relay (``reached_through_relay``)."""
    latency_s: float = 0.0
    requests: int = 0

    def transport(self, peer_id: PeerId, addresses: list[Address]) -> MemoryTransport:
        """Create the transport of node ``peer_id`` listening on ``addresses``."""
        transport = MemoryTransport(self, peer_id, list(addresses))
        self.nodes[peer_id] = transport
        for address in addresses:
            self.listeners[address] = peer_id
        return transport


@dataclass
class MemoryTransport:
    """One node's view of a :class:`MemoryNetwork` (satisfies ``RpcTransport``)."""

    network: MemoryNetwork
    peer_id: PeerId
    addresses: list[Address]
    handlers: dict[str, RpcHandler] = field(default_factory=dict)
    address_book: dict[PeerId, list[Address]] = field(default_factory=lambda: defaultdict(list))

    def add_handler(self, protocol_id: str, handler: RpcHandler) -> None:
        """Serve ``protocol_id`` with ``handler``."""
        self.handlers[protocol_id] = handler

    def add_addresses(self, peer_id: PeerId, addresses: list[Address]) -> None:
        """The address-book hook (``remember_addresses``)."""
        known = self.address_book[peer_id]
        for address in addresses:
            if address not in known:
                known.append(address)

    def observed_address(self, peer: PeerId) -> Address | None:
        """The first address ``peer`` listens on (in memory every request comes from there);
        None for a peer marked as reached through a relay (a relayed connection shows the
        relay's address, not the peer's)."""
        if peer in self.network.relayed:
            return None
        node = self.network.nodes.get(peer)
        return node.addresses[0] if node is not None and node.addresses else None

    def reached_through_relay(self, peer: PeerId) -> bool:
        """Whether the test marked ``peer`` as reached through a relay (``network.relayed``)."""
        return peer in self.network.relayed

    async def request(
        self,
        peer: PeerId | PeerAddr,
        protocol_id: str,
        payload: bytes,
        *,
        timeout_s: float = 10.0,
    ) -> bytes:
        """Deliver ``payload`` to the target's handler and return its answer."""
        await trio.lowlevel.checkpoint()
        net = self.network
        net.requests += 1
        if isinstance(peer, PeerAddr):
            target = net.listeners.get(peer.address)
            if target is None:
                raise ConnectError(f"nothing listens on {peer.address}")
            if peer.peer_id is not None and peer.peer_id != target:
                raise PeerIdMismatchError(f"{peer.address} is {target.short()}")
        else:
            target = peer
            known = self.address_book.get(peer, [])
            if not any(net.listeners.get(a) == peer for a in known):
                raise ConnectError(f"no known address for {peer.short()}")
        remote = net.nodes.get(target)
        if remote is None or target in net.dead:
            with trio.move_on_after(timeout_s):
                await trio.sleep_forever()
            raise RpcError("timeout", f"{target.short()} did not answer")
        handler = remote.handlers.get(protocol_id)
        if handler is None:
            raise RpcError("unknown-protocol", protocol_id)
        if net.latency_s:
            await trio.sleep(net.latency_s)
        return await handler(self.peer_id, payload)
