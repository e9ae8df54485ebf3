"""One connection per peer, reused: dial deduplication, an address book, idle close.

Choices:

* **Simultaneous dials.** If two peers dial each other at once, both connections survive; new
  streams go to the *newest* live connection to that peer (:meth:`ConnectionManager.connection`)
  and the older one is closed by the idle rule once its streams are done. Closing one at once
  would need both sides to agree which, and would cut streams already in flight.
* **Dial sharing.** Concurrent :meth:`ConnectionManager.connect` calls for the same peer id (or,
  without an id, the same address) share one dial task running in the manager's nursery; each
  caller applies its own timeout, and a cancelled caller does not cancel the dial for others.
* **Streams.** The manager accepts every stream of every connection and runs the stream handler
  (normally :class:`~lattica.net.rpc.Rpc`) in its own task; the stream is closed when the
  handler returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable

import trio

from lattica.errors import ConnectError, LatticaError, PeerIdMismatchError
from lattica.identity import PeerId
from lattica.net.address import PeerAddr, format_host_port
from lattica.net.connection import Connection
from lattica.net.datagram import Address
from lattica.net.endpoint import Endpoint
from lattica.net.stream import QuicStream

logger = logging.getLogger("lattica.net.manager")

_MAX_ADDRESSES_PER_PEER = 16

StreamHandler = Callable[[QuicStream], Awaitable[None]]


class _Dial:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.connection: Connection | None = None
        self.error: LatticaError | None = None


class ConnectionManager:
    """One connection per peer, reused; dial dedup; address book; idle close; reconnect on demand."""

    def __init__(self, endpoint: Endpoint, *, idle_close_s: float | None = 300.0) -> None:
        self.endpoint = endpoint
        self.idle_close_s = idle_close_s
        self._by_peer: dict[PeerId, list[Connection]] = {}
        self._addresses: dict[PeerId, list[Address]] = {}
        self._dials: dict[PeerId | Address, _Dial] = {}
        self._stream_handler: StreamHandler | None = None
        self._on_connected: list[Callable[[Connection], None]] = []
        self._on_disconnected: list[Callable[[Connection], None]] = []
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept streams and keep connections until cancelled (start it with ``nursery.start``)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.endpoint.set_connection_handler(self._connection_added)
                for connection in self.endpoint.connections():
                    self._connection_added(connection)
                if self.idle_close_s is not None:
                    nursery.start_soon(self._close_idle_connections, self.idle_close_s)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # -- address book ---------------------------------------------------------------------

    def add_addresses(self, peer_id: PeerId, addresses: Iterable[Address]) -> None:
        """Remember where ``peer_id`` may be reached (most recently added first, bounded)."""
        known = self._addresses.setdefault(peer_id, [])
        for address in addresses:
            if address in known:
                known.remove(address)
            known.insert(0, address)
        del known[_MAX_ADDRESSES_PER_PEER:]

    def addresses(self, peer_id: PeerId) -> list[Address]:
        """Known addresses of ``peer_id``, most recent first."""
        return list(self._addresses.get(peer_id, ()))

    # -- connections ----------------------------------------------------------------------

    def connection(self, peer_id: PeerId) -> Connection | None:
        """The newest live connection to ``peer_id``, if any."""
        for connection in reversed(self._by_peer.get(peer_id, ())):
            if not connection.is_closed:
                return connection
        return None

    def connections(self) -> list[Connection]:
        """Every live connection (at most a transient two per peer, see module notes)."""
        return [c for conns in self._by_peer.values() for c in conns if not c.is_closed]

    def on_connected(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback`` synchronously for every new authenticated connection."""
        self._on_connected.append(callback)

    def on_disconnected(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback`` once for every connection after it closed."""
        self._on_disconnected.append(callback)

    def set_stream_handler(self, handler: StreamHandler) -> None:
        """Run ``handler(stream)`` in its own task for every stream a peer opens."""
        self._stream_handler = handler

    async def connect(self, peer: PeerAddr | PeerId, *, timeout_s: float | None = None) -> Connection:
        """A live connection to ``peer``, reusing one if it exists, else dialling.

        ``PeerId``: dial its known addresses in turn. ``PeerAddr`` with an id: reuse or dial
        that address, requiring that id. ``PeerAddr`` without an id: dial and learn the id.
        Raises :class:`~lattica.errors.ConnectError` or
        :class:`~lattica.errors.PeerIdMismatchError`.
        """
        if isinstance(peer, PeerId):
            peer_id: PeerId | None = peer
            candidates = self.addresses(peer)
        else:
            peer_id = peer.peer_id
            candidates = [peer.address]
            if peer_id is not None:
                candidates += [a for a in self.addresses(peer_id) if a != peer.address]
        if peer_id is not None:
            existing = self.connection(peer_id)
            if existing is not None:
                await trio.lowlevel.checkpoint()
                return existing
            if not candidates:
                raise ConnectError(f"no known address for peer {peer_id}")
        nursery = self._nursery
        if nursery is None:
            raise ConnectError("the connection manager is not running")
        key: PeerId | Address = peer_id if peer_id is not None else candidates[0]
        dial = self._dials.get(key)
        if dial is None:
            dial = self._dials[key] = _Dial()
            nursery.start_soon(self._dial, key, dial, peer_id, candidates, timeout_s)
        timeout = math.inf if timeout_s is None else timeout_s
        with trio.move_on_after(timeout):
            await dial.done.wait()
        if not dial.done.is_set():
            raise ConnectError(f"connecting to {_describe(peer)} timed out after {timeout_s:g} s")
        if dial.error is not None:
            raise dial.error
        assert dial.connection is not None
        return dial.connection

    async def _dial(
        self,
        key: PeerId | Address,
        dial: _Dial,
        peer_id: PeerId | None,
        candidates: list[Address],
        timeout_s: float | None,
    ) -> None:
        errors: list[LatticaError] = []
        try:
            for address in candidates:
                try:
                    connection = await self.endpoint.connect(
                        address, expected_peer=peer_id, timeout_s=timeout_s
                    )
                except (ConnectError, PeerIdMismatchError) as exc:
                    errors.append(exc)
                    continue
                dial.connection = connection
                return
            if len(errors) == 1:
                dial.error = errors[0]
            else:
                tried = "; ".join(str(e) for e in errors)
                dial.error = ConnectError(f"could not connect to {peer_id}: {tried}")
        finally:
            if dial.connection is None and dial.error is None:
                dial.error = ConnectError("the connection manager stopped")
            del self._dials[key]
            dial.done.set()

    # -- per-connection tasks -------------------------------------------------------------

    def _connection_added(self, connection: Connection) -> None:
        nursery = self._nursery
        if nursery is None:
            return
        self._by_peer.setdefault(connection.peer_id, []).append(connection)
        if connection.direction == "outbound":
            self.add_addresses(connection.peer_id, [connection.remote_address])
        logger.debug("connected %r", connection)
        for callback in self._on_connected:
            try:
                callback(connection)
            except Exception:
                logger.exception("on_connected callback failed for %r", connection)
        nursery.start_soon(self._serve, connection)

    async def _serve(self, connection: Connection) -> None:
        try:
            while True:
                try:
                    stream = await connection.accept_stream()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                assert self._nursery is not None
                self._nursery.start_soon(self._handle_stream, stream)
        finally:
            # accept_stream only fails once the connection is closed (or we are cancelled).
            self._connection_removed(connection)

    def _connection_removed(self, connection: Connection) -> None:
        conns = self._by_peer.get(connection.peer_id, [])
        if connection in conns:
            conns.remove(connection)
            if not conns:
                del self._by_peer[connection.peer_id]
        logger.debug("disconnected %r: %s", connection, connection.close_reason)
        for callback in self._on_disconnected:
            try:
                callback(connection)
            except Exception:
                logger.exception("on_disconnected callback failed for %r", connection)

    async def _handle_stream(self, stream: QuicStream) -> None:
        try:
            if self._stream_handler is not None:
                await self._stream_handler(stream)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            logger.debug("stream %r ended: %s", stream, exc)
        except Exception:
            logger.exception("stream handler failed on %r", stream)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _close_idle_connections(self, idle_close_s: float) -> None:
        # A periodic sweep: idleness is judged at most idle_close_s / 4 late.
        while True:
            await trio.sleep(idle_close_s / 4)
            now = trio.current_time()
            for connection in self.connections():
                if (
                    connection.open_stream_count == 0
                    and now - connection.last_stream_activity_at >= idle_close_s
                ):
                    await connection.aclose("idle")


def _describe(peer: PeerAddr | PeerId) -> str:
    """Text for logs and errors naming a dial target."""
    if isinstance(peer, PeerId):
        return str(peer)
    return str(peer) if peer.peer_id else format_host_port(peer.address)
