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
* :meth:`BulkPath.stream_carrier` goes one step further for one long bulk stream: a lane of
  its own (:mod:`lattica.net.tcp_lane`) where the TCP path exists, dialled to the address the
  TCP connection was dialled to (or the QUIC connection's, for a connection the peer dialled).
  A peer that does not admit a lane (its limits, or a version without lanes) gets yamux
  streams for ``lane_retry_after_s``.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from typing import Final, TypeVar

import trio

from lattica.errors import ConnectError, ConnectRefusedError, PeerIdMismatchError
from lattica.identity import PeerId
from lattica.net.address import PeerAddr, format_host_port
from lattica.net.connection import Connection
from lattica.net.datagram import Address
from lattica.net.manager import ConnectionManager
from lattica.net.tcp_connection import TcpConnection
from lattica.net.tcp_lane import TcpLane
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
        lane_retry_after_s: float = 30.0,
        lanes: bool = True,
    ) -> None:
        self.manager = manager
        self.tcp = tcp
        self.tcp_attempt_timeout_s = tcp_attempt_timeout_s
        self.retry_after_s = retry_after_s
        self.lane_retry_after_s = lane_retry_after_s
        self.lanes = lanes
        """Whether :meth:`stream_carrier` opens lanes at all."""
        self._no_lane_until: OrderedDict[PeerId, float] = OrderedDict()
        self._dialled_at: OrderedDict[PeerId, Address] = OrderedDict()
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
        _remember(self._dialled_at, quic.peer_id, address)
        return connection

    async def stream_carrier(self, peer: PeerId, *, timeout_s: float = 10.0) -> Connection | TcpConnection | TcpLane:
        """Where to open one long bulk stream to ``peer``: a new lane (the caller closes it with
        its stream) where a TLS-over-TCP path exists and the peer admits one, else
        :meth:`connection`. Raises what :meth:`connection` raises."""
        connection = await self.connection(peer, timeout_s=timeout_s)
        if not isinstance(connection, TcpConnection) or not self.lanes:
            return connection
        now = trio.current_time()
        if self._no_lane_until.get(peer, -1.0) > now:
            return connection
        address = self._dialled_at.get(peer)
        if connection.direction == "outbound":
            address = connection.remote_address
        if address is None:  # the peer dialled us: its listening port is the QUIC one
            quic = self.manager.connection(peer)
            if quic is None or quic.relayed_via is not None:
                return connection
            address = quic.remote_address
        try:
            # The stream on it is an RPC stream (wire frames): large frames land each whole.
            return await self.tcp.open_lane(
                PeerAddr(address, peer), timeout_s=self.tcp_attempt_timeout_s, framed_receive=True
            )
        except (ConnectError, PeerIdMismatchError) as exc:
            logger.debug("no lane to %s at %s: %s", peer, format_host_port(address), exc)
            _remember(self._no_lane_until, peer, now + self.lane_retry_after_s)
            return connection


_V = TypeVar("_V")


def _remember(table: OrderedDict[PeerId, _V], peer: PeerId, value: _V) -> None:
    """Set ``table[peer]``, keeping at most ``MAX_REMEMBERED_FAILURES`` (oldest dropped)."""
    table[peer] = value
    table.move_to_end(peer)
    while len(table) > MAX_REMEMBERED_FAILURES:
        table.popitem(last=False)
