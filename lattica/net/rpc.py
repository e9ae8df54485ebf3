"""Request/response and stream protocols over authenticated connections.

Every RPC stream starts with a :class:`~lattica.net.rpc_messages.StreamHeader` frame naming the
protocol id. Request/response: the caller sends one ``Request`` frame and EOF; the callee answers
with one ``Response`` or ``Error`` frame and EOF. Stream protocols get the stream right after the
header and own it until their handler returns.

Invariants:

* Every frame is read with its length checked first (``lattica.wire`` framing), exactly to its
  end: an oversize request is refused with ``Error("too-large")`` before its body is read, and
  the stream is then stopped, so a peer cannot make us buffer it.
* A caller always gets an :class:`~lattica.errors.RpcError` with a code from :data:`ERROR_CODES`
  (or :class:`~lattica.errors.PeerIdMismatchError` when the peer at the address is someone else).
* At most ``max_concurrent_inbound_per_peer`` calls per peer, ``max_concurrent_inbound_per_address``
  per source address group (an IPv4 address or IPv6 /64; peers reached through a relay count
  under that relay), and ``max_concurrent_inbound`` from all peers together, run at once; more get
  ``busy``. A request must arrive whole within
  ``request_timeout_s`` of its header (and its reply be taken within as long).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from lattica.errors import (
    ConnectError,
    MalformedMessageError,
    PeerIdMismatchError,
    RemoteProtocolError,
    RpcError,
)
from lattica.identity import PeerId
from lattica.key_counts import add_one, remove_one
from lattica.net.address import PeerAddr, address_group
from lattica.net.connection import Connection
from lattica.net.datagram import Address
from lattica.net.manager import ConnectionManager
from lattica.net.rpc_messages import (
    MAX_ERROR_CODE_CHARS,
    MAX_ERROR_MESSAGE_CHARS,
    Error,
    Request,
    Response,
    RpcMessage,
    StreamHeader,
)
from lattica.net.stream import QuicStream, receive_exactly
from lattica.net.tcp_connection import TcpConnection
from lattica.net.tcp_lane import TcpLane
from lattica.wire import decode_frame, encode_frame

logger = logging.getLogger("lattica.net.rpc")

PING_PROTOCOL: Final = "/lattica/ping/1"

ERROR_CODES: Final = frozenset(
    {
        "timeout",
        "unknown-protocol",
        "handler-error",
        "too-large",
        "busy",
        "connection-lost",
        "connect-failed",
        "protocol-error",
    }
)

RequestHandler = Callable[[PeerId, bytes], Awaitable[bytes]]
Target = PeerId | PeerAddr | Connection | TcpConnection | TcpLane
"""Whom a call goes to: a peer (dialled over QUIC if needed) or a given connection of either
transport (QUIC :class:`Connection`, TLS-over-TCP :class:`TcpConnection`, or a
:class:`TcpLane`, whose one stream :meth:`Rpc.open_stream` opens)."""
StreamProtocolHandler = Callable[[QuicStream, PeerId], Awaitable[None]]

_MAX_HEADER_FRAME_BYTES = 1024
_FRAME_OVERHEAD_BYTES = 64  # msgpack map, tag and length prefix around a payload
_UNBOUNDED_FRAME_BYTES = (1 << 32) - 1
_LENGTH = struct.Struct(">I")


class _FrameTooLarge(Exception):
    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


async def _receive_message(stream: QuicStream, max_frame_bytes: int) -> RpcMessage:
    """Read exactly one frame. Raises ``_FrameTooLarge`` before reading an oversize body,
    ``RemoteProtocolError`` on a malformed or truncated frame."""
    prefix = await receive_exactly(stream, 4)
    (length,) = _LENGTH.unpack(prefix)
    if length > max_frame_bytes:
        raise _FrameTooLarge(length)
    body = await receive_exactly(stream, length)
    try:
        return decode_frame(prefix + body, RpcMessage, max_frame_bytes=max_frame_bytes)  # type: ignore[arg-type]
    except RecursionError:
        # msgspec recurses into values it skips (an unknown field nested thousands deep in a
        # few KB): the peer's malformed frame, never our crash.
        raise MalformedMessageError("a frame nests too deeply") from None


def source_group(connection: object) -> str | None:
    """The source address group a connection comes from, for per-address limits: an IPv4
    address or an IPv6 /64 (:func:`~lattica.net.address.address_group`); None for a peer
    reached through a relay (its address is the relay's, shared by many: it counts by peer id,
    and the relay bounds how many ids reach us through it) or a connection of another kind."""
    if isinstance(connection, Connection) and connection.relayed_via is not None:
        return None
    if isinstance(connection, Connection | TcpConnection | TcpLane):
        return address_group(connection.remote_address[0], ipv6_prefix_bits=64)
    return None


def _call_group(connection: object) -> str | None:
    """What the per-address cap on calls counts a connection under: its source address group,
    or for a peer reached through a relay, that relay (a hostile relay can bring any number of
    ids it minted, up to the circuits we accept through it: 16 ids x 64 calls took all 512)."""
    group = source_group(connection)
    if group is None and isinstance(connection, Connection) and connection.relayed_via is not None:
        return f"relay {connection.relayed_via}"
    return group


def _frame(message: RpcMessage) -> bytes:
    return encode_frame(message, max_frame_bytes=_UNBOUNDED_FRAME_BYTES)


_MAX_REFUSAL_FRAME_BYTES = 4 + 16 + MAX_ERROR_CODE_CHARS * 4 + MAX_ERROR_MESSAGE_CHARS * 4
"""The longest Error frame a refusal can be (UTF-8 code and message at their caps)."""


def stream_refusal(data: bytes | bytearray | memoryview) -> RpcError | None:
    """The refusal of a stream by the peer's RPC layer, if ``data`` is exactly one: the
    :class:`~lattica.net.rpc_messages.Error` frame a node sends instead of a protocol's first
    message when it has no handler for the protocol (``unknown-protocol``) or is at its stream
    caps (``busy``). None for anything else; never raises.

    For stream-protocol clients whose own decoder rejected the first bytes of a stream: they
    can then report what the peer said ("unknown-protocol: no handler for ...") instead of
    a decode error about the wrong message type."""
    if len(data) > _MAX_REFUSAL_FRAME_BYTES:
        return None
    try:
        message: RpcMessage = decode_frame(bytes(data), RpcMessage, max_frame_bytes=_MAX_REFUSAL_FRAME_BYTES)  # type: ignore[arg-type]
    except (RemoteProtocolError, RecursionError):
        return None
    return RpcError(message.code, message.message) if isinstance(message, Error) else None


class Rpc:
    """Request/response and stream protocols over connections; each stream starts with a protocol id."""

    def __init__(
        self,
        manager: ConnectionManager,
        *,
        max_concurrent_inbound_per_peer: int = 64,
        max_request_bytes: int = 1 << 20,
        max_response_bytes: int = 16 << 20,
        header_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        max_concurrent_inbound: int = 512,
        max_concurrent_inbound_per_address: int = 128,
    ) -> None:
        self.manager = manager
        self.max_concurrent_inbound_per_peer = max_concurrent_inbound_per_peer
        self.max_concurrent_inbound = max_concurrent_inbound
        self.max_concurrent_inbound_per_address = max_concurrent_inbound_per_address
        self._inbound_per_address: dict[str, int] = {}
        self.request_timeout_s = request_timeout_s
        self._inbound_total = 0
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.header_timeout_s = header_timeout_s
        self._handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamProtocolHandler] = {}
        self._inbound_per_peer: dict[PeerId, int] = {}
        manager.set_stream_handler(self._serve_stream)
        self.add_handler(PING_PROTOCOL, _echo)

    def observed_address(self, peer: PeerId) -> Address | None:
        """The remote address of the newest live connection to ``peer``, or None: where the
        network shows the peer, as opposed to the addresses it claims for itself. None for a
        relayed connection: its remote address is the relay's."""
        connection = self.manager.connection(peer)
        if connection is None or connection.relayed_via is not None:
            return None
        return connection.remote_address

    def reached_through_relay(self, peer: PeerId) -> bool:
        """True when the preferred live connection to ``peer`` runs through a relay (the manager
        prefers direct ones, so then there is no direct connection)."""
        connection = self.manager.connection(peer)
        return connection is not None and connection.relayed_via is not None

    def protocols(self) -> list[str]:
        """Protocol ids this node answers (request/response and stream protocols), sorted."""
        return sorted({*self._handlers, *self._stream_handlers})

    def add_handler(self, protocol_id: str, handler: RequestHandler) -> None:
        """Answer requests for ``protocol_id`` with ``handler(peer, payload) -> reply``.

        The handler may raise :class:`RpcError` to send that code and message; any other
        exception is logged and reaches the caller as ``handler-error``."""
        self._check_protocol_id(protocol_id)
        self._handlers[protocol_id] = handler

    def add_stream_handler(self, protocol_id: str, handler: StreamProtocolHandler) -> None:
        """Hand streams for ``protocol_id`` to ``handler(stream, peer)``; the stream is closed
        when the handler returns."""
        self._check_protocol_id(protocol_id)
        self._stream_handlers[protocol_id] = handler

    @staticmethod
    def _check_protocol_id(protocol_id: str) -> None:
        if not 1 <= len(protocol_id) <= 256:
            raise ValueError("a protocol id is 1 to 256 characters")

    # -- calling --------------------------------------------------------------------------

    async def request(
        self,
        peer: Target,
        protocol_id: str,
        payload: bytes,
        *,
        timeout_s: float = 10.0,
    ) -> bytes:
        """Call ``protocol_id`` on ``peer`` (dialled if needed, or a given connection) and
        return its reply; ``timeout_s`` bounds the dial and the exchange together.

        A request whose connection the peer ended with a Stateless Reset (it restarted) is sent
        once more on a fresh dial, within the same ``timeout_s``. A connection that received
        nothing at all while the request timed out is closed
        (:meth:`ConnectionManager.close_if_silent_since`), so the next request dials again:
        this is how a peer that restarted at the same address becomes reachable again.
        Raises :class:`RpcError` (``code`` in :data:`ERROR_CODES`; ``connect-failed`` with a
        :class:`~lattica.errors.DialSelfError` as ``__cause__`` for our own id or address) or
        :class:`~lattica.errors.PeerIdMismatchError`.
        """
        self._check_protocol_id(protocol_id)
        connection: Connection | TcpConnection | TcpLane | None = None
        sent_at = 0.0
        try:
            with trio.fail_after(timeout_s):
                reset: RpcError | None = None
                for attempt in (1, 2):
                    try:
                        connection, stream = await self._open(peer, protocol_id)
                        sent_at = trio.current_time()
                        async with stream:
                            return await self._exchange(stream, payload)
                    except RpcError as exc:
                        if reset is not None and exc.code == "connect-failed":
                            raise reset from exc  # no fresh dial: the reset says more
                        # A Stateless Reset: the peer restarted and is there, the old connection
                        # is not. Once more on a fresh dial, within the same timeout (every
                        # request handler here is idempotent: ping, identify, AutoNAT, DHT,
                        # space updates).
                        if attempt == 2 or exc.code != "connection-lost" or not _reset_by_peer(peer, connection):
                            raise
                        reset, connection = exc, None
                raise AssertionError("not reached")  # pragma: no cover - the loop returns or raises
        except trio.TooSlowError:
            if isinstance(connection, Connection):
                with trio.CancelScope(shield=True):
                    await self.manager.close_if_silent_since(connection, sent_at)
            raise RpcError(
                "timeout", f"no answer to {protocol_id} within {timeout_s:g} s"
            ) from None

    async def open_stream(self, peer: Target, protocol_id: str) -> QuicStream:
        """Open a stream speaking ``protocol_id`` (its header already sent) to ``peer``.

        Raises :class:`RpcError` (``connect-failed``, ``connection-lost``) or
        :class:`~lattica.errors.PeerIdMismatchError`."""
        self._check_protocol_id(protocol_id)
        _connection, stream = await self._open(peer, protocol_id)
        return stream

    async def ping(self, peer: Target, *, timeout_s: float = 10.0) -> float:
        """Round-trip time of one ``/lattica/ping/1`` echo in seconds (``trio.current_time()``),
        including the dial if there was no connection yet."""
        nonce = os.urandom(16)
        start = trio.current_time()
        reply = await self.request(peer, PING_PROTOCOL, nonce, timeout_s=timeout_s)
        if reply != nonce:
            raise RpcError("protocol-error", "ping reply does not echo the request")
        return trio.current_time() - start

    async def _open(
        self, peer: Target, protocol_id: str
    ) -> tuple[Connection | TcpConnection | TcpLane, QuicStream]:
        connection: Connection | TcpConnection | TcpLane
        if isinstance(peer, Connection | TcpConnection | TcpLane):
            connection = peer
        else:
            try:
                connection = await self.manager.connect(peer)
            except PeerIdMismatchError:
                raise
            except ConnectError as exc:
                raise RpcError("connect-failed", str(exc)) from exc
        try:
            stream = await connection.open_stream()
            try:
                await stream.send_all(_frame(StreamHeader(protocol_id)))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise RpcError("connection-lost", str(exc)) from exc
        return connection, stream

    async def _exchange(self, stream: QuicStream, payload: bytes) -> bytes:
        try:
            try:
                await stream.send_all(_frame(Request(payload)))
                await stream.send_eof()
            except trio.BrokenResourceError:
                # The callee may have refused early (too-large, busy) and stopped reading;
                # its answer is what the caller needs.
                pass
            reply = await _receive_message(stream, self.max_response_bytes)
        except _FrameTooLarge as exc:
            raise RpcError(
                "too-large", f"reply of {exc.length} bytes exceeds {self.max_response_bytes}"
            ) from None
        except RemoteProtocolError as exc:
            raise RpcError("protocol-error", str(exc)) from exc
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise RpcError("connection-lost", str(exc)) from exc
        if isinstance(reply, Response):
            return reply.payload
        if isinstance(reply, Error):
            raise RpcError(reply.code, reply.message)
        raise RpcError("protocol-error", f"unexpected {type(reply).__name__} frame")

    # -- serving --------------------------------------------------------------------------

    async def serve_stream(self, stream: QuicStream) -> None:
        """Serve one stream a peer opened, on any transport: read its header, run the handler.

        The connection manager calls it for QUIC streams; hand it to
        :class:`~lattica.net.tcp_transport.TcpTransport` as its stream handler for TLS-over-TCP.
        Never raises for what the peer sent."""
        await self._serve_stream(stream)

    async def _serve_stream(self, stream: QuicStream) -> None:
        peer = stream.connection.peer_id
        try:
            with trio.fail_after(self.header_timeout_s):
                header = await _receive_message(stream, _MAX_HEADER_FRAME_BYTES)
        except (trio.TooSlowError, _FrameTooLarge, RemoteProtocolError) as exc:
            logger.debug("dropping a stream from %s without a valid header: %r", peer, exc)
            return
        if not isinstance(header, StreamHeader):
            await self._refuse(stream, "protocol-error", "a stream must start with a header")
            return
        protocol_id = header.protocol
        handler = self._handlers.get(protocol_id)
        stream_handler = self._stream_handlers.get(protocol_id)
        if handler is None and stream_handler is None:
            await self._refuse(stream, "unknown-protocol", f"no handler for {protocol_id}")
            return
        running = self._inbound_per_peer.get(peer, 0)
        if running >= self.max_concurrent_inbound_per_peer:
            await self._refuse(
                stream, "busy", f"{running} calls from you are running; try again later"
            )
            return
        group = _call_group(stream.connection)
        if group is not None and self._inbound_per_address.get(group, 0) >= self.max_concurrent_inbound_per_address:
            # Peer ids cost nothing to mint: eight from one host took all 512 calls (review).
            await self._refuse(stream, "busy", "calls from your address are at their limit; try again later")
            return
        if self._inbound_total >= self.max_concurrent_inbound:
            # Peer ids cost nothing to mint: the per-peer cap alone does not bound the node.
            await self._refuse(stream, "busy", "this node is serving its limit of calls; try again later")
            return
        add_one(self._inbound_per_peer, peer)
        self._inbound_total += 1
        if group is not None:
            add_one(self._inbound_per_address, group)
        try:
            if stream_handler is not None:
                await stream_handler(stream, peer)
            else:
                assert handler is not None
                await self._serve_request(stream, peer, protocol_id, handler)
        finally:
            self._inbound_total -= 1
            remove_one(self._inbound_per_peer, peer)
            if group is not None:
                remove_one(self._inbound_per_address, group)

    async def _serve_request(
        self, stream: QuicStream, peer: PeerId, protocol_id: str, handler: RequestHandler
    ) -> None:
        try:
            # A request that trickles in would hold up to max_request_bytes of our memory and
            # one of the peer's call slots for as long as the peer liked.
            with trio.fail_after(self.request_timeout_s):
                request = await _receive_message(
                    stream, self.max_request_bytes + _FRAME_OVERHEAD_BYTES
                )
        except trio.TooSlowError:
            logger.debug("dropping a %s request from %s that did not arrive in time", protocol_id, peer)
            return
        except _FrameTooLarge as exc:
            await self._refuse(
                stream,
                "too-large",
                f"request frame of {exc.length} bytes; the limit is {self.max_request_bytes}",
            )
            return
        except RemoteProtocolError as exc:
            await self._refuse(stream, "protocol-error", str(exc))
            return
        if not isinstance(request, Request):
            await self._refuse(stream, "protocol-error", "expected a request frame")
            return
        if len(request.payload) > self.max_request_bytes:
            await self._refuse(stream, "too-large", f"request exceeds {self.max_request_bytes}")
            return
        try:
            reply = await handler(peer, request.payload)
        except RpcError as exc:
            await self._refuse(stream, exc.code[:64], exc.message[:1024])
            return
        except Exception as exc:
            logger.exception("handler for %s failed on a request from %s", protocol_id, peer)
            await self._refuse(stream, "handler-error", type(exc).__name__)
            return
        with trio.move_on_after(self.request_timeout_s):  # a peer that never reads its reply
            await stream.send_all(_frame(Response(reply)))
            await stream.send_eof()

    async def _refuse(self, stream: QuicStream, code: str, message: str) -> None:
        # The stream is closed by the manager afterwards; unread request bytes make that a
        # STOP_SENDING, which is what stops a peer still sending an oversize request.
        await stream.send_all(_frame(Error(code, message)))
        await stream.send_eof()


async def _echo(peer: PeerId, payload: bytes) -> bytes:
    return payload


def _reset_by_peer(peer: object, connection: object) -> bool:
    """Whether a request to ``peer`` (not to a connection given by the caller) failed because
    the peer reset the connection statelessly (it restarted)."""
    return (
        not isinstance(peer, Connection | TcpConnection | TcpLane)
        and isinstance(connection, Connection)
        and connection.reset_by_peer
    )
