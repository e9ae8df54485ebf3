"""Choosing the connection for bulk data: TLS-over-TCP when the peer accepts it directly, else QUIC.

QUIC (one UDP socket, hole punching, relays) reaches peers behind NATs; TLS over TCP moves bulk
data several times faster where a direct TCP path exists. :class:`BulkPath` asks QUIC first
(which proves where the peer is, as the network shows it), then tries TCP at that host and the
same port number (``net.tcp_port`` defaults to the UDP port) and falls back to the QUIC
connection when TCP cannot be reached. Both connection kinds carry the same streams and RPC.

Rules:

* The TCP attempt is bounded by ``tcp_attempt_timeout_s``; an address where it failed is not
  tried again for ``retry_after_s`` (at most ``MAX_REMEMBERED_FAILURES`` remembered), so a
  peer behind a NAT costs one failed attempt, not one per transfer. Only a *refused* attempt
  (nothing listened: the peer was down or restarting) is tried again at once beside a new QUIC
  connection, which may be the restarted peer; a refusal costs a round trip, not the timeout
  (review findings: a seeder killed and restarted served a resumed fetch over QUIC, at a tenth
  of the speed, for five minutes; retrying every timeout beside every new connection cost 3 s
  per transfer).
* A relayed QUIC connection is never followed by a TCP attempt: its address is the relay's,
  which many peers share, and TCP there would reach the relay, not the peer.
* The TCP dial must prove the same peer id as the QUIC connection
  (:class:`~lattica.errors.PeerIdMismatchError` counts as a failure, never as success).
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from typing import Final

import trio

from lattica.errors import ConnectError, ConnectRefusedError, PeerIdMismatchError
from lattica.identity import PeerId
from lattica.net.address import PeerAddr, format_host_port
from lattica.net.connection import Connection
from lattica.net.datagram import Address
from lattica.net.manager import ConnectionManager
from lattica.net.tcp_connection import TcpConnection
from lattica.net.tcp_transport import TcpTransport

logger = logging.getLogger("lattica.net.bulk")

MAX_REMEMBERED_FAILURES: Final = 1024


class BulkPath:
    """The connection to carry bulk data to a peer (seconds of ``trio.current_time()``)."""

    def __init__(
        self,
        manager: ConnectionManager,
        tcp: TcpTransport,
        *,
        tcp_attempt_timeout_s: float = 3.0,
        retry_after_s: float = 300.0,
    ) -> None:
        self.manager = manager
        self.tcp = tcp
        self.tcp_attempt_timeout_s = tcp_attempt_timeout_s
        self.retry_after_s = retry_after_s
        # When TCP failed at an address, whether it was refused, and the QUIC connection it was
        # tried beside (weakly: remembering a failure must not keep a dead connection alive).
        self._failed_at: OrderedDict[Address, tuple[float, bool, weakref.ref[Connection]]] = OrderedDict()

    def tcp_recently_failed(self, address: Address, beside: Connection | None = None) -> bool:
        """True if a TCP attempt to ``address`` failed less than ``retry_after_s`` ago, unless it
        was refused beside another QUIC connection than ``beside`` (given)."""
        entry = self._failed_at.get(address)
        if entry is None:
            return False
        failed_at, refused, tried_beside = entry
        if refused and beside is not None and tried_beside() is not beside:
            return False
        return trio.current_time() < failed_at + self.retry_after_s

    async def connection(self, peer: PeerAddr | PeerId, *, timeout_s: float = 10.0) -> Connection | TcpConnection:
        """A live TLS-over-TCP connection to ``peer`` if one exists or can be made directly,
        else the QUIC connection. ``timeout_s`` bounds the QUIC connect; the TCP attempt adds
        at most ``tcp_attempt_timeout_s``. Raises what
        :meth:`~lattica.net.manager.ConnectionManager.connect` raises."""
        peer_id = peer if isinstance(peer, PeerId) else peer.peer_id
        if peer_id is not None and (existing := self.tcp.connection(peer_id)) is not None:
            await trio.lowlevel.checkpoint()
            return existing
        quic = await self.manager.connect(peer, timeout_s=timeout_s)
        existing = self.tcp.connection(quic.peer_id)
        if existing is not None:
            return existing
        address = quic.remote_address
        if quic.relayed_via is not None or self.tcp_recently_failed(address, quic):
            return quic
        try:
            connection = await self.tcp.connect(PeerAddr(address, quic.peer_id), timeout_s=self.tcp_attempt_timeout_s)
        except (ConnectError, PeerIdMismatchError) as exc:
            logger.debug("no TLS-over-TCP path to %s at %s: %s", quic.peer_id, format_host_port(address), exc)
            refused = isinstance(exc, ConnectRefusedError)
            self._failed_at[address] = (trio.current_time(), refused, weakref.ref(quic))
            self._failed_at.move_to_end(address)
            while len(self._failed_at) > MAX_REMEMBERED_FAILURES:
                self._failed_at.popitem(last=False)
            return quic
        self._failed_at.pop(address, None)
        return connection
