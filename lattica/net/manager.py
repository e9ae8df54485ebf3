"""One connection per peer, reused: dial deduplication, an address book, idle close.

Choices and rules:

* **A failure involving one peer ends at most that peer's dial or connection.** Whatever goes
  wrong while dialling one peer (a bad address, a socket error, a bug in a lower layer) ends
  that dial with a :class:`~lattica.errors.ConnectError` for its callers, never the manager's
  nursery. Addresses are checked before the endpoint ever sees them (canonical IP literals,
  ports 1..65535, an address family the socket can reach), because a bad destination would
  otherwise fail later in the endpoint's own tasks.
* **Explicit addresses are dialled.** ``connect(PeerId)`` reuses any live connection to that
  peer; ``connect(PeerAddr)`` reuses only a connection whose remote address is that address, and
  otherwise dials it even when another connection to the same peer exists.
  :meth:`ConnectionManager.connect_and_report` says whether a connection was reused.
* **Never ourselves.** Dialling our own peer id is refused (:class:`~lattica.errors.DialSelfError`);
  an address-only dial that turns out to reach this node is closed and fails the same way.
* **Names** in user-given addresses are resolved with trio's asynchronous ``getaddrinfo``
  (or an injected resolver), bounded by ``resolve_timeout_s``; names never come from the
  network (see :func:`~lattica.net.address.network_address`).
* **Silent connections are dropped.** A peer that restarted at the same address has lost our
  connection's state and silently drops its packets; we would keep sending on it until the idle
  timeout. :meth:`ConnectionManager.close_if_silent_since` (called by RPC after a request timed
  out) closes a connection that received nothing since the request was sent, so the next request
  dials again.
* **Simultaneous dials.** If two peers dial each other at once, both connections survive; new
  streams go to the *newest* live connection to that peer (:meth:`ConnectionManager.connection`)
  and the older one is closed by the idle rule once its streams are done. Closing one at once
  would need both sides to agree which, and would cut streams already in flight.
* **Dial sharing.** Concurrent :meth:`ConnectionManager.connect` calls for the same target share
  one dial task running in the manager's nursery; each caller applies its own timeout, and a
  cancelled caller does not cancel the dial for others.
* **Handlers are tasks.** Connection and disconnection handlers run as tasks in the manager's
  nursery, so an exception in one surfaces (it is a bug in local code) instead of being logged
  and forgotten. The stream handler (normally :class:`~lattica.net.rpc.Rpc`) runs in a task per
  stream; what the peer caused (a broken stream, invalid data) ends that stream; anything else
  is logged with its traceback and ends that peer's connection, never the node.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from lattica.errors import (
    ConnectError,
    ConnectTimeoutError,
    DialSelfError,
    LatticaError,
    PeerIdMismatchError,
    RemoteProtocolError,
)
from lattica.identity import PeerId
from lattica.net.address import (
    InvalidAddressError,
    PeerAddr,
    canonical_ip,
    dialable_port,
    family_mismatch,
    format_host_port,
    is_dns_name,
    network_address,
)
from lattica.net.connection import Connection
from lattica.net.datagram import Address
from lattica.net.endpoint import Endpoint
from lattica.net.log_once import LogOnce
from lattica.net.stream import QuicStream

logger = logging.getLogger("lattica.net.manager")

_MAX_ADDRESSES_PER_PEER = 16
_MAX_RESOLVED_ADDRESSES = 8

StreamHandler = Callable[[QuicStream], Awaitable[None]]
ConnectionHandler = Callable[[Connection], Awaitable[None]]
Resolver = Callable[[str, int], Awaitable[list[Address]]]
"""``resolve(name, port)``: the addresses a DNS name stands for (IP literals)."""


async def resolve_with_getaddrinfo(name: str, port: int) -> list[Address]:
    """Resolve ``name`` with trio's asynchronous ``getaddrinfo`` (a worker thread, so the event
    loop never blocks). Raises ``OSError`` (``socket.gaierror``) when the name does not resolve."""
    infos = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_DGRAM)
    return [(str(info[4][0]), int(info[4][1])) for info in infos]


@dataclass(frozen=True, slots=True)
class ConnectReport:
    """What :meth:`ConnectionManager.connect_and_report` did."""

    connection: Connection
    reused: bool
    """True if an existing connection was used, False if this call (or one it joined) dialled."""


class _Dial:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.connection: Connection | None = None
        self.error: LatticaError | None = None


class ConnectionManager:
    """One connection per peer, reused; dial dedup; address book; idle close; reconnect on demand.

    ``resolve`` turns names in user-given addresses into IP literals (default: trio's
    asynchronous ``getaddrinfo``); ``resolve_timeout_s`` bounds it; ``idle_close_s`` closes
    connections without streams for that long (``None``: never).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        idle_close_s: float | None = 300.0,
        resolve: Resolver = resolve_with_getaddrinfo,
        resolve_timeout_s: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.idle_close_s = idle_close_s
        self.resolve_timeout_s = resolve_timeout_s
        self._resolve = resolve
        self._by_peer: dict[PeerId, list[Connection]] = {}
        self._addresses: dict[PeerId, list[Address]] = {}
        self._dials: dict[object, _Dial] = {}
        self._stream_handler: StreamHandler | None = None
        self._on_connected: list[ConnectionHandler] = []
        self._on_disconnected: list[ConnectionHandler] = []
        self._nursery: trio.Nursery | None = None
        self._log_once = LogOnce(logger)
        self.invalid_addresses_ignored = 0
        """Addresses :meth:`add_addresses` refused (monotonic counter)."""

    @property
    def peer_id(self) -> PeerId:
        """This node's own peer id (never dialled)."""
        return self.endpoint.peer_id

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
        """Remember where ``peer_id`` may be reached (most recently added first, bounded).

        Addresses are canonicalised; those that are not dialable IP literals (see
        :func:`~lattica.net.address.network_address`) are dropped, as are addresses for our own
        peer id. Never raises for bad input: it comes from the network.
        """
        if peer_id == self.peer_id:
            return
        accepted: list[Address] = []
        for address in addresses:
            try:
                host, port = address
                accepted.append(network_address(host, port))
            except (InvalidAddressError, TypeError, ValueError) as exc:
                # Peer ids cost nothing to mint: one line in all, then a counter.
                self.invalid_addresses_ignored += 1
                self._log_once.warning(
                    "bad-address",
                    "ignoring an invalid address for %s: %s (further ones are counted in "
                    "invalid_addresses_ignored, not logged)",
                    peer_id,
                    exc,
                )
        if not accepted:
            return
        known = self._addresses.setdefault(peer_id, [])
        for address in accepted:
            if address in known:
                known.remove(address)
            known.insert(0, address)
        del known[_MAX_ADDRESSES_PER_PEER:]

    def addresses(self, peer_id: PeerId) -> list[Address]:
        """Known addresses of ``peer_id``, most recent first."""
        return list(self._addresses.get(peer_id, ()))

    # -- connections ----------------------------------------------------------------------

    def connection(self, peer_id: PeerId) -> Connection | None:
        """The newest live direct connection to ``peer_id``, else the newest relayed one, if any
        (path policy: prefer direct, keep the relay as fallback)."""
        fallback: Connection | None = None
        for connection in reversed(self._by_peer.get(peer_id, ())):
            if connection.is_closed:
                continue
            if connection.relayed_via is None:
                return connection
            fallback = fallback or connection
        return fallback

    def connections(self) -> list[Connection]:
        """Every live connection (at most a transient two per peer, see module notes)."""
        return [c for conns in self._by_peer.values() for c in conns if not c.is_closed]

    def on_connected(self, handler: ConnectionHandler) -> None:
        """Run ``await handler(connection)`` as a task for every new authenticated connection.

        The task runs in the manager's nursery: an exception in it is a bug and surfaces."""
        self._on_connected.append(handler)

    def on_disconnected(self, handler: ConnectionHandler) -> None:
        """Run ``await handler(connection)`` as a task once for every connection after it closed."""
        self._on_disconnected.append(handler)

    def set_stream_handler(self, handler: StreamHandler) -> None:
        """Run ``handler(stream)`` in its own task for every stream a peer opens."""
        self._stream_handler = handler

    async def connect(self, peer: PeerAddr | PeerId, *, timeout_s: float | None = None) -> Connection:
        """A live connection to ``peer``: see :meth:`connect_and_report`."""
        return (await self.connect_and_report(peer, timeout_s=timeout_s)).connection

    async def connect_and_report(
        self, peer: PeerAddr | PeerId, *, timeout_s: float | None = None
    ) -> ConnectReport:
        """A live connection to ``peer``, and whether an existing one was reused.

        ``PeerId``: reuse any live connection to it, else dial its known addresses in turn.
        ``PeerAddr``: reuse a live connection whose remote address is that address (and whose
        peer is the given id, if any); otherwise dial that address, even when another
        connection to the same peer exists. A DNS name is resolved first (``timeout_s`` covers
        resolution and dial). Raises :class:`~lattica.errors.ConnectError` (unreachable,
        timeout, no usable address, an address family the socket cannot reach),
        :class:`~lattica.errors.DialSelfError` (the target is this node) or
        :class:`~lattica.errors.PeerIdMismatchError`.
        """
        timeout = math.inf if timeout_s is None else timeout_s
        with trio.move_on_after(timeout) as scope:
            return await self._connect(peer, timeout_s)
        assert scope.cancelled_caught
        raise ConnectTimeoutError(f"connecting to {_describe(peer)} timed out after {timeout_s:g} s")

    async def _connect(self, peer: PeerAddr | PeerId, timeout_s: float | None) -> ConnectReport:
        peer_id = peer if isinstance(peer, PeerId) else peer.peer_id
        if peer_id == self.peer_id:
            raise DialSelfError("refusing to dial this node's own peer id")
        key: object
        if isinstance(peer, PeerId):
            existing = self.connection(peer)
            if existing is not None:
                await trio.lowlevel.checkpoint()
                return ConnectReport(existing, reused=True)
            candidates = self._reachable(self.addresses(peer), str(peer))
            key = peer
        else:
            candidates = self._reachable(await self._resolve_target(peer.address), str(peer))
            for connection in reversed(self.connections()):
                if (
                    connection.relayed_via is None
                    and connection.remote_address in candidates
                    and peer_id in (None, connection.peer_id)
                ):
                    await trio.lowlevel.checkpoint()
                    return ConnectReport(connection, reused=True)
            key = (peer_id, candidates[0])
        nursery = self._nursery
        if nursery is None:
            raise ConnectError("the connection manager is not running")
        dial = self._dials.get(key)
        if dial is None:
            dial = self._dials[key] = _Dial()
            nursery.start_soon(self._dial, key, dial, peer_id, candidates, timeout_s)
        await dial.done.wait()
        if dial.error is not None:
            raise dial.error
        assert dial.connection is not None
        return ConnectReport(dial.connection, reused=False)

    async def _resolve_target(self, address: Address) -> list[Address]:
        """IP literals for a user-given address: the literal itself, or what its name resolves to."""
        try:
            host, port = address
            if canonical_ip(host) is not None:
                return [network_address(host, port)]
            if not is_dns_name(host):
                raise InvalidAddressError(f"{host!r:.80} is neither an IP address nor a DNS name")
            dialable_port(port)  # before asking any resolver
        except (InvalidAddressError, TypeError, ValueError) as exc:
            raise ConnectError(f"cannot dial {address!r:.100}: {exc}") from None
        resolved: list[Address] = []
        with trio.move_on_after(self.resolve_timeout_s):
            try:
                answers = await self._resolve(host, port)
            except Exception as exc:
                # gaierror normally; a resolver is outside code, so anything ends this dial only.
                raise ConnectError(f"cannot resolve {host!r}: {exc}") from None
            for answer in answers:
                try:
                    address = network_address(*answer)
                except (InvalidAddressError, TypeError, ValueError):
                    continue
                if address not in resolved:
                    resolved.append(address)
            if not resolved:
                raise ConnectError(f"{host!r} resolved to no usable address")
            return resolved[:_MAX_RESOLVED_ADDRESSES]
        raise ConnectTimeoutError(f"resolving {host!r} timed out after {self.resolve_timeout_s:g} s")

    def _reachable(self, addresses: list[Address], target: str) -> list[Address]:
        """The addresses this socket can send to; :class:`ConnectError` at once if none."""
        if not addresses:
            raise ConnectError(f"no known address for peer {target}")
        local_host = self.endpoint.local_address[0]
        reasons = [family_mismatch(local_host, host) for host, _ in addresses]
        usable = [a for a, reason in zip(addresses, reasons, strict=True) if reason is None]
        if not usable:
            raise ConnectError(f"cannot dial {target}: {reasons[0]}")
        return usable

    async def _dial(
        self,
        key: object,
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
                except Exception as exc:
                    # Whatever one peer's dial hits ends that dial, never the manager.
                    logger.info("dialling %s failed", format_host_port(address), exc_info=True)
                    errors.append(
                        ConnectError(f"dialling {format_host_port(address)} failed: {exc!r}")
                    )
                    continue
                if connection.peer_id == self.peer_id:
                    # _connection_added closes both ends; the caller learns why.
                    errors.append(
                        DialSelfError(f"{format_host_port(address)} is this node's own address")
                    )
                    continue
                dial.connection = connection
                return
            if len(errors) == 1:
                dial.error = errors[0]
            elif any(isinstance(e, DialSelfError) for e in errors):
                dial.error = next(e for e in errors if isinstance(e, DialSelfError))
            else:
                tried = "; ".join(str(e) for e in errors)
                dial.error = ConnectError(f"could not connect to {peer_id}: {tried}")
        finally:
            if dial.connection is None and dial.error is None:
                dial.error = ConnectError("the connection manager stopped")
            del self._dials[key]
            dial.done.set()

    async def close_if_silent_since(self, connection: Connection, since: float) -> bool:
        """Close ``connection`` if nothing arrived on it since ``since`` (``trio.current_time()``).

        Called after a request on it timed out: a connection that did not even carry an
        acknowledgement during the whole timeout is dead (typically the peer restarted and no
        longer knows it), and the next request should dial again. Returns whether it closed it.
        """
        if connection.is_closed or connection.last_received_at > since:
            return False
        logger.info("closing %r: silent since a request was sent on it", connection)
        await connection.aclose("silent through a request timeout")
        return True

    # -- per-connection tasks -------------------------------------------------------------

    def _connection_added(self, connection: Connection) -> None:
        nursery = self._nursery
        if nursery is None:
            return
        if connection.peer_id == self.peer_id:
            logger.info("closing a connection to ourselves at %s", format_host_port(connection.remote_address))
            nursery.start_soon(connection.aclose, "connection to self")
            return
        self._by_peer.setdefault(connection.peer_id, []).append(connection)
        if connection.direction == "outbound" and connection.relayed_via is None:
            # A relayed connection's remote address is the relay's, not the peer's.
            self.add_addresses(connection.peer_id, [connection.remote_address])
        logger.debug("connected %r", connection)
        for handler in self._on_connected:
            nursery.start_soon(handler, connection)
        nursery.start_soon(self._serve, connection)

    async def _serve(self, connection: Connection) -> None:
        try:
            while True:
                try:
                    stream = await connection.accept_stream()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                assert self._nursery is not None
                self._nursery.start_soon(self._handle_stream, connection, stream)
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
        nursery = self._nursery
        if nursery is not None:
            for handler in self._on_disconnected:
                nursery.start_soon(handler, connection)

    async def _handle_stream(self, connection: Connection, stream: QuicStream) -> None:
        try:
            if self._stream_handler is not None:
                await self._stream_handler(stream)
        except (trio.ClosedResourceError, trio.BrokenResourceError, RemoteProtocolError) as exc:
            logger.debug("stream %r ended: %s", stream, exc)
        except Exception:
            # A bug reached by one peer's stream: loud, and contained to that peer.
            logger.exception("stream handler failed on %r; closing its connection", stream)
            with trio.CancelScope(shield=True):
                await connection.aclose("internal error")
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
