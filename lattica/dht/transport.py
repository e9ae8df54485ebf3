"""The only network interface the DHT uses (``lattica.net.Rpc`` satisfies it structurally).

Contract assumed by the DHT:

* ``add_handler(protocol_id, handler)`` registers ``handler(peer_id, payload) -> response``;
  ``peer_id`` has been authenticated by the transport (QUIC handshake).
* ``request(peer, protocol_id, payload, timeout_s=...)`` dials ``peer`` if needed (a
  :class:`PeerId` is dialled at the addresses previously given to the address book; a
  :class:`PeerAddr` at its address, verifying its peer id when it names one) and returns the
  response payload. It raises :class:`~lattica.errors.RpcError`,
  :class:`~lattica.errors.ConnectError` or :class:`~lattica.errors.PeerIdMismatchError` on
  failure.
* ``observed_address(peer)`` is the remote address of the live connection to ``peer`` (what the
  network shows), or None when there is none (or it runs through a relay).
* ``reached_through_relay(peer)`` is True when the only live connection to ``peer`` runs through
  a relay circuit: the peer is behind a NAT, and the addresses it claims cannot be dialled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from lattica.identity import PeerId
from lattica.net.address import PeerAddr
from lattica.net.datagram import Address

RpcHandler = Callable[[PeerId, bytes], Awaitable[bytes]]
RememberAddresses = Callable[[PeerId, list[Address]], None]


class RpcTransport(Protocol):
    """Request/response RPC over authenticated connections."""

    def add_handler(self, protocol_id: str, handler: RpcHandler) -> None:
        """Serve ``protocol_id`` requests with ``handler``."""
        ...

    async def request(
        self,
        peer: PeerId | PeerAddr,
        protocol_id: str,
        payload: bytes,
        *,
        timeout_s: float = 10.0,
    ) -> bytes:
        """Send one request and return the response payload (see the module docstring)."""
        ...

    def observed_address(self, peer: PeerId) -> Address | None:
        """Where the live connection to ``peer`` comes from, or None (see the module docstring)."""
        ...

    def reached_through_relay(self, peer: PeerId) -> bool:
        """True when ``peer`` is connected only through a relay (see the module docstring)."""
        ...
