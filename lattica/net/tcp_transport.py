"""The TLS 1.3-over-TCP transport: a listener and a dialer of :class:`TcpConnection`.

The fast path for bulk transfer on direct routes (aioquic's pure-Python packet code holds QUIC
near 30-40 MB/s here; see docs/benchmarks.md). Same identity and mutual authentication as QUIC,
same streams (:class:`~lattica.net.stream.QuicStream`), so an :class:`~lattica.net.rpc.Rpc`
serves and calls over it unchanged (``rpc.serve_stream`` as the stream handler,
``rpc.request(tcp_connection, ...)`` to call).

Rules:

* **Listen only where asked.** :meth:`TcpTransport.listen` binds exactly the host and port it
  is given; nothing listens until it is called.
* **Hostile input ends one connection at most.** A handshake must finish within
  ``handshake_timeout_s`` and send its first bytes within ``FIRST_BYTES_TIMEOUT_S``; at most
  ``MAX_CONCURRENT_HANDSHAKES`` run at once, at most ``MAX_HANDSHAKES_PER_IP`` of them from one
  source address, and at most ``max_connections`` connections live (more are closed at
  accept), so idle sockets from one address cannot lock others out; every error a peer can
  cause (TLS, certificate, yamux framing, flow control, too many streams) closes that
  connection. A stream handler's own bug is logged and closes that peer's connection.
* **Identity.** A dial to ``PEERID@HOST:PORT`` fails with
  :class:`~lattica.errors.PeerIdMismatchError` (and the connection is closed) when the peer
  there proves another id; a dial that reaches this node itself fails with
  :class:`~lattica.errors.DialSelfError`. Hosts must be IP literals: no name is resolved here.
* **Reuse.** :meth:`TcpTransport.connect` reuses a live connection to the same peer id;
  concurrent dials to one peer are not merged (both connections work; the newest is reused).
* **Lanes** (:mod:`lattica.net.tcp_lane`, ALPN ``lattica-lane/1``): one stream per connection,
  its bytes moved by a thread of its own. Each costs a thread, so at most ``MAX_INBOUND_LANES``
  are admitted at once, ``MAX_INBOUND_LANES_PER_PEER`` from one peer id (more are closed after
  the handshake; the dialler falls back to a yamux stream); they count toward
  ``max_connections`` like any connection, and :meth:`TcpTransport.open_lane` keeps at most
  ``MAX_OUTBOUND_LANES`` of ours open. The handshake limits above apply to them unchanged.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import trio

from lattica.errors import (
    ConnectError,
    ConnectRefusedError,
    ConnectTimeoutError,
    DialSelfError,
    PeerIdMismatchError,
    RemoteProtocolError,
)
from lattica.identity import Identity, PeerId
from lattica.key_counts import add_one, remove_one
from lattica.net.address import (
    InvalidAddressError,
    PeerAddr,
    address_group,
    format_host_port,
    network_address,
)
from lattica.net.config import EndpointConfig
from lattica.net.datagram import Address
from lattica.net.log_once import LogOnce
from lattica.net.stream import QuicStream
from lattica.net.tcp_connection import RECEIVE_BYTES, TcpConnection, tls_handshake
from lattica.net.tcp_lane import LANE_ACCEPTED, TcpLane
from lattica.net.tls_channel import ALPN_LANE_PROTOCOL, ALPN_TCP_PROTOCOL, TlsChannel
from lattica.net.yamux import INITIAL_STREAM_WINDOW_BYTES

logger = logging.getLogger("lattica.net.tcp")

MAX_CONCURRENT_HANDSHAKES: Final = 64
"""Inbound TLS handshakes in progress at once; more connections are closed at accept."""

MAX_HANDSHAKES_PER_IP: Final = 8
"""Inbound TLS handshakes in progress at once from one source (an IPv4 address or an IPv6 /64);
more from it are closed at accept, so one address cannot hold the global
``MAX_CONCURRENT_HANDSHAKES``."""

FIRST_BYTES_TIMEOUT_S: Final = 3.0
"""Seconds an inbound TCP client has to send its first TLS bytes (the ClientHello, which a real
client sends at once); a silent socket is dropped then, not after ``handshake_timeout_s``."""

MAX_INBOUND_LANES: Final = 32
"""Lanes peers may hold open here at once (each one is a thread)."""
MAX_INBOUND_LANES_PER_PEER: Final = 4
"""Of those, from one peer id (a fetch opens one per seeder)."""
MAX_INBOUND_LANES_PER_IP: Final = 8
"""Of those, from one source (an IPv4 address or an IPv6 /64): peer ids cost nothing to mint,
so the per-peer cap alone let one host hold every lane (review finding)."""
MAX_OUTBOUND_LANES: Final = 32
"""Lanes this node keeps open at once; :meth:`TcpTransport.open_lane` refuses more."""

StreamHandler = Callable[[QuicStream], Awaitable[None]]
_T = TypeVar("_T")


class LaneRefusedError(ConnectError):
    """The peer (or this node's own limit) did not admit a lane; use a yamux stream instead."""


class TcpTransport:
    """Listener and dialer of mutually authenticated TLS 1.3-over-TCP connections.

    ``config`` supplies the handshake timeout, keepalive and idle timers, the per-connection
    stream limit (``max_incoming_streams``), the per-stream receive window
    (``stream_receive_window_bytes``, at least yamux's 256 KiB) and ``max_connections``.
    ``stream_handler(stream)`` runs in its own task for every stream a peer opens; the stream
    is closed when it returns. Run :meth:`run` (``nursery.start``) before anything else.
    """

    def __init__(
        self,
        identity: Identity,
        config: EndpointConfig | None = None,
        *,
        stream_handler: StreamHandler | None = None,
        idle_close_s: float | None = 300.0,
    ) -> None:
        self.identity = identity
        self.config = config or EndpointConfig()
        self.idle_close_s = idle_close_s
        self._stream_handler = stream_handler
        self._by_peer: dict[PeerId, list[TcpConnection]] = {}
        self._inbound_lanes: dict[PeerId, list[TcpLane]] = {}
        self._lane_slots: dict[PeerId, int] = {}  # inbound lanes admitted or being admitted
        self._lane_slots_by_source: dict[str, int] = {}
        self._outbound_lanes: set[TcpLane] = set()
        self._handshakes = 0
        self._handshakes_by_source: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._log_once = LogOnce(logger)
        self.listen_addresses: list[Address] = []
        """Where :meth:`listen` bound (host, port), in call order."""
        self.refused_connections = 0
        """Inbound TCP connections closed at accept because of the limits (monotonic)."""
        self.lanes_admitted = 0
        """Inbound lanes admitted (monotonic)."""
        self.lanes_refused = 0
        """Inbound lanes closed after the handshake because of the lane limits (monotonic)."""
        self.lanes_opened = 0
        """Lanes this node dialled that the peer admitted (monotonic)."""

    @property
    def peer_id(self) -> PeerId:
        """This node's own peer id."""
        return self.identity.peer_id

    def set_stream_handler(self, handler: StreamHandler) -> None:
        """Replace the handler of streams peers open (e.g. ``rpc.serve_stream``)."""
        self._stream_handler = handler

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every listener and connection until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            # Lanes run on threads of their own: tell each to stop with the node.
            for lane in [*self._outbound_lanes, *(lane for lanes in self._inbound_lanes.values() for lane in lanes)]:
                lane.close("the transport stopped")

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("TcpTransport.run() is not running")
        return self._nursery

    # -- connections ----------------------------------------------------------------------

    def connection(self, peer_id: PeerId) -> TcpConnection | None:
        """The newest live connection to ``peer_id``, or None."""
        for connection in reversed(self._by_peer.get(peer_id, ())):
            if not connection.is_closed:
                return connection
        return None

    def connections(self) -> list[TcpConnection]:
        """Every live connection."""
        return [c for cs in self._by_peer.values() for c in cs if not c.is_closed]

    def lanes(self) -> list[TcpLane]:
        """Every live lane, inbound and outbound."""
        inbound = [lane for lanes in self._inbound_lanes.values() for lane in lanes]
        return [lane for lane in [*inbound, *self._outbound_lanes] if not lane.is_closed]

    def _connection_count(self) -> int:
        return len(self.connections()) + len(self.lanes())

    # -- listening ------------------------------------------------------------------------

    async def listen(self, host: str | None, port: int) -> Address:
        """Accept connections on ``host:port`` (an IP literal, or None for every address of
        both families; port 0 picks one); returns the last bound address (all are in
        :attr:`listen_addresses`). Raises ``OSError`` if the address cannot be bound."""
        nursery = self._require_nursery()
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound: Address | None = None
        for listener in listeners:
            sockname = listener.socket.getsockname()
            bound = (str(sockname[0]), int(sockname[1]))
            self.listen_addresses.append(bound)
            nursery.start_soon(self._accept_loop, listener)
        assert bound is not None
        return bound

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    tcp = await listener.accept()
                except OSError as exc:  # EMFILE and friends: wait rather than spin or crash
                    self._log_once.warning("accept", "accepting a TCP connection failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                try:
                    peername = tcp.socket.getpeername()
                except OSError:  # already gone
                    await tcp.aclose()
                    continue
                remote: Address = (str(peername[0]), int(peername[1]))
                source = address_group(remote[0], ipv6_prefix_bits=64)
                if (
                    self._handshakes >= MAX_CONCURRENT_HANDSHAKES
                    or self._handshakes_by_source.get(source, 0) >= MAX_HANDSHAKES_PER_IP
                    or self._connection_count() >= self.config.max_connections
                ):
                    self.refused_connections += 1
                    self._log_once.warning("limit", "refusing TCP connections over the limits (counted, not logged)")
                    await tcp.aclose()
                    continue
                # Counted here, before the task starts, so a burst of accepts sees its own slots.
                self._handshakes += 1
                add_one(self._handshakes_by_source, source)
                self._require_nursery().start_soon(self._serve_inbound, tcp, remote, source)

    async def _serve_inbound(self, tcp: trio.SocketStream, remote: Address, source: str) -> None:
        channel = TlsChannel(self.identity, is_client=False)
        timeout_s = self.config.handshake_timeout_s
        try:
            with trio.fail_after(timeout_s):
                leftover = await tls_handshake(
                    tcp, channel, first_receive_timeout_s=min(FIRST_BYTES_TIMEOUT_S, timeout_s)
                )
        except (
            trio.TooSlowError,
            RemoteProtocolError,
            ConnectError,
            trio.BrokenResourceError,
            OSError,
        ) as exc:
            logger.debug("TLS handshake from %s failed: %r", format_host_port(remote), exc)
            with trio.CancelScope(shield=True):
                await _send_then_close(tcp, channel)
            return
        finally:
            self._handshakes -= 1
            remove_one(self._handshakes_by_source, source)
        if channel.alpn == ALPN_LANE_PROTOCOL:
            await self._serve_lane(tcp, channel, remote, leftover)
            return
        connection = self._connection_for(tcp, channel, remote, leftover)
        if connection.peer_id == self.peer_id:
            await connection.aclose("a connection from ourselves")
        await self._run_connection(connection)

    async def _serve_lane(self, tcp: trio.SocketStream, channel: TlsChannel, remote: Address, leftover: bytes) -> None:
        peer = channel.peer_id
        assert peer is not None
        # Slots are taken before the first await below: lanes admitted at once from one peer
        # must not all pass the check before any of them is counted.
        held = self._lane_slots.get(peer, 0)
        source = address_group(remote[0], ipv6_prefix_bits=64)
        from_source = self._lane_slots_by_source.get(source, 0)
        admitted = (
            peer != self.peer_id
            and not leftover  # the client speaks only after LANE_ACCEPTED
            and held < MAX_INBOUND_LANES_PER_PEER
            and from_source < MAX_INBOUND_LANES_PER_IP
            and sum(self._lane_slots.values()) < MAX_INBOUND_LANES
        )
        if not admitted:
            self.lanes_refused += 1
            with trio.CancelScope(shield=True):
                await _send_then_close(tcp, channel)
            return
        self._lane_slots[peer] = held + 1
        self._lane_slots_by_source[source] = from_source + 1
        try:
            # The admission byte is queued in the TLS session and sent by the lane's thread
            # as its first bytes: a lane that cannot get its pipe or thread is then refused
            # (the client sees the connection close first and uses yamux), not admitted and
            # dropped (review finding).
            channel.send(LANE_ACCEPTED)
            try:
                lane = self._lane_for(tcp, channel, remote, b"")
            except OSError as exc:  # no descriptor for its pipe (EMFILE): this lane only
                self._log_once.warning("lane-fds", "cannot run an inbound lane: %s", exc)
                return
            self._inbound_lanes.setdefault(peer, []).append(lane)
            try:
                try:
                    lane.start()
                except RuntimeError as exc:
                    self._log_once.warning("lane-thread", "cannot run an inbound lane: %s", exc)
                    return
                self.lanes_admitted += 1
                await self._handle_stream(lane, lane.stream)
            finally:
                lane.close("no longer served")
                lanes = self._inbound_lanes[peer]
                lanes.remove(lane)
                if not lanes:
                    del self._inbound_lanes[peer]
        finally:
            remove_one(self._lane_slots, peer)
            remove_one(self._lane_slots_by_source, source)

    def _lane_for(
        self, tcp: trio.SocketStream, channel: TlsChannel, remote: Address, leftover: bytes, *, framed: bool = False
    ) -> TcpLane:
        """A lane owning ``tcp``'s socket from here (trio lets go of it); ``framed``: see
        :meth:`open_lane`. Raises ``OSError`` (no descriptor for the lane's pipe), the socket
        closed then."""
        sock = socket.socket(fileno=tcp.socket.detach())
        try:
            return TcpLane(
                sock,
                channel,
                remote_address=remote,
                receive_window_bytes=max(RECEIVE_BYTES, self.config.stream_receive_window_bytes),
                idle_timeout_s=self.config.idle_timeout_s,
                received_with_handshake=leftover,
                framed_receive=framed,
            )
        except BaseException:
            sock.close()
            raise

    async def open_lane(
        self, peer: PeerAddr, *, timeout_s: float | None = None, framed_receive: bool = False
    ) -> TcpLane:
        """A new lane (:mod:`lattica.net.tcp_lane`) to ``peer``, which must name its peer id;
        close it (``lane.close()`` or its stream's ``aclose``) when done. ``framed_receive``:
        what the peer sends on it is :mod:`lattica.wire` frames (an RPC stream), so large ones
        are received each into memory of its own (:mod:`lattica.net.frame_receiver`).

        ``timeout_s`` (default: the handshake timeout) bounds TCP connect, TLS handshake and
        the peer's admission. Raises :class:`LaneRefusedError` (the peer did not admit it, or
        ``MAX_OUTBOUND_LANES`` are open), :class:`~lattica.errors.ConnectTimeoutError`,
        :class:`~lattica.errors.ConnectError` or :class:`~lattica.errors.PeerIdMismatchError`."""
        if peer.peer_id is None:
            raise ValueError("a lane is dialled to a known peer id")
        if peer.peer_id == self.peer_id:
            raise DialSelfError("refusing to dial this node's own peer id")
        self._outbound_lanes = {lane for lane in self._outbound_lanes if not lane.is_closed}
        if len(self._outbound_lanes) >= MAX_OUTBOUND_LANES:
            raise LaneRefusedError(f"{MAX_OUTBOUND_LANES} lanes of this node are open")
        lane = await self._dial_within(
            peer, timeout_s, functools.partial(self._dial_lane, framed=framed_receive), what="lane"
        )
        try:
            lane.start()
        except RuntimeError as exc:  # no thread to be had: the yamux stream will do
            raise LaneRefusedError(f"cannot run a lane: {exc}") from None
        self._outbound_lanes.add(lane)
        self.lanes_opened += 1
        return lane

    async def _dial_lane(self, peer: PeerAddr, host: str, port: int, *, framed: bool) -> TcpLane:
        where = format_host_port((host, port))
        tcp, channel, received = await self._dial_tls(peer, host, port, ALPN_LANE_PROTOCOL)
        try:
            while not received:  # the admission byte (nothing else comes before our header)
                data = await tcp.receive_some(RECEIVE_BYTES)
                if not data:
                    raise LaneRefusedError(f"{where} did not admit a lane")
                received = channel.receive_data(data)
                if channel.peer_closed:
                    raise LaneRefusedError(f"{where} did not admit a lane")
            if received[:1] != LANE_ACCEPTED:
                raise ConnectError(f"{where} answered a lane with {received[:8]!r}")
            return self._lane_for(tcp, channel, (host, port), received[1:], framed=framed)
        except (RemoteProtocolError, trio.BrokenResourceError, OSError) as exc:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
            raise LaneRefusedError(f"lane to {where} failed: {exc}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
            raise

    # -- dialling -------------------------------------------------------------------------

    async def connect(self, peer: PeerAddr, *, timeout_s: float | None = None) -> TcpConnection:
        """A connection to ``peer``: a live one to the same peer id, or a new dial.

        ``timeout_s`` (default: the handshake timeout) bounds TCP connect, TLS handshake and
        the peer's confirmation. Raises :class:`~lattica.errors.ConnectTimeoutError`,
        :class:`~lattica.errors.ConnectError`, :class:`~lattica.errors.DialSelfError` or
        :class:`~lattica.errors.PeerIdMismatchError`."""
        if peer.peer_id is not None:
            if peer.peer_id == self.peer_id:
                raise DialSelfError("refusing to dial this node's own peer id")
            existing = self.connection(peer.peer_id)
            if existing is not None:
                await trio.lowlevel.checkpoint()
                return existing
        return await self._dial_within(peer, timeout_s, self._dial, what="TLS-over-TCP connection")

    async def _dial_within(
        self,
        peer: PeerAddr,
        timeout_s: float | None,
        dial: Callable[[PeerAddr, str, int], Awaitable[_T]],
        *,
        what: str,
    ) -> _T:
        """``dial(peer, host, port)`` for ``peer``'s IP literal address, within ``timeout_s``
        (default: the handshake timeout). Raises :class:`~lattica.errors.ConnectError` for an
        address that is not one, :class:`~lattica.errors.ConnectTimeoutError` (naming
        ``what``) when the time runs out, and what ``dial`` raises."""
        try:
            host, port = network_address(*peer.address)
        except InvalidAddressError as exc:
            raise ConnectError(f"cannot dial {peer}: {exc}") from None
        limit_s = self.config.handshake_timeout_s if timeout_s is None else timeout_s
        try:
            with trio.fail_after(limit_s):
                return await dial(peer, host, port)
        except trio.TooSlowError:
            raise ConnectTimeoutError(f"no {what} to {peer} within {limit_s:g} s") from None

    async def _dial(self, peer: PeerAddr, host: str, port: int) -> TcpConnection:
        tcp, channel, leftover = await self._dial_tls(peer, host, port, ALPN_TCP_PROTOCOL)
        connection = self._connection_for(tcp, channel, (host, port), leftover)
        await self._require_nursery().start(self._run_connection, connection)
        try:
            await connection.wait_confirmed()
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose("dial abandoned")
            raise
        return connection

    async def _dial_tls(
        self, peer: PeerAddr, host: str, port: int, alpn: bytes
    ) -> tuple[trio.SocketStream, TlsChannel, bytes]:
        """TCP connect and TLS handshake offering ``alpn``; the peer id proven is checked.
        Returns the stream, the channel and application bytes that came with the handshake."""
        where = format_host_port((host, port))
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            error = ConnectRefusedError if _refused(exc) else ConnectError
            raise error(f"TCP connect to {where} failed: {exc.strerror or exc}") from None
        channel = TlsChannel(self.identity, is_client=True, alpn=alpn)
        try:
            leftover = await tls_handshake(tcp, channel)
        except (RemoteProtocolError, trio.BrokenResourceError, OSError) as exc:
            with trio.CancelScope(shield=True):
                await _send_then_close(tcp, channel)
            raise ConnectError(f"TLS handshake with {where} failed: {exc}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
            raise
        proven = channel.peer_id
        if (peer.peer_id is not None and proven != peer.peer_id) or proven == self.peer_id:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
            if proven == self.peer_id:
                raise DialSelfError(f"{where} is this node itself")
            raise PeerIdMismatchError(f"dialled {peer.peer_id} at {where} but the peer there proved to be {proven}")
        return tcp, channel, leftover

    # -- running connections --------------------------------------------------------------

    def _connection_for(
        self, tcp: trio.SocketStream, channel: TlsChannel, remote: Address, leftover: bytes
    ) -> TcpConnection:
        config = self.config
        return TcpConnection(
            tcp,
            channel,
            remote_address=remote,
            max_streams=config.max_incoming_streams,
            stream_window_bytes=max(INITIAL_STREAM_WINDOW_BYTES, config.stream_receive_window_bytes),
            keepalive_interval_s=config.keepalive_interval_s,
            idle_timeout_s=config.idle_timeout_s,
            idle_close_s=self.idle_close_s,
            received_with_handshake=leftover,
        )

    async def _run_connection(
        self, connection: TcpConnection, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        peers = self._by_peer.setdefault(connection.peer_id, [])
        peers.append(connection)
        try:
            await self._serve_connection(connection, task_status)
        except Exception:
            # A bug on our side while serving one peer: that peer's connection ends, not the node.
            logger.exception("serving %r failed", connection)
        finally:
            peers.remove(connection)
            if not peers:
                del self._by_peer[connection.peer_id]

    async def _serve_connection(self, connection: TcpConnection, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(connection.run)
                task_status.started()
                while True:
                    try:
                        stream = await connection.accept_stream()
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        break
                    nursery.start_soon(self._handle_stream, connection, stream)
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose("no longer served")

    async def _handle_stream(self, connection: TcpConnection | TcpLane, stream: QuicStream) -> None:
        try:
            if self._stream_handler is not None:
                await self._stream_handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as exc:
            logger.debug("stream from %s ended: %r", connection.peer_id, exc)
        except Exception:
            logger.exception("a stream handler failed on a stream from %s", connection.peer_id)
            await connection.aclose("local stream handler error")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def _send_then_close(tcp: trio.SocketStream, channel: TlsChannel) -> None:
    # Tell the peer why (a TLS alert) if we can, quickly; then close.
    with trio.move_on_after(1.0):
        try:
            alert = channel.data_to_send()
            if alert:
                await tcp.send_all(alert)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await tcp.aclose()


def _refused(exc: OSError) -> bool:
    """Whether a failed ``open_tcp_stream`` was refused outright (trio wraps each attempt's
    error in an ``ExceptionGroup`` as the cause)."""
    cause = exc.__cause__
    attempts = cause.exceptions if isinstance(cause, BaseExceptionGroup) else (cause or exc,)
    return all(isinstance(attempt, ConnectionRefusedError) for attempt in attempts)

