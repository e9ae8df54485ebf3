"""The node's own control methods: ``id``, ``status``, ``peers``, ``ping``, ``connect``.

Each method has a params Struct (unknown fields are refused) and a result Struct; the CLI reads
the results as JSON. Other services register theirs the same way from their own package
(:func:`lattica.control.dht_methods.register_dht_methods`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import msgspec
import trio

from lattica import __version__
from lattica.control.errors import FAILED, INVALID_PARAMS, TIMEOUT, ControlError
from lattica.control.limits import MAX_DIAL_STRING_CHARS, MAX_PING_TIMEOUT_S
from lattica.control.messages import NoParams
from lattica.control.registry import MethodRegistry
from lattica.errors import ConnectError, ConnectTimeoutError, DialSelfError, InvalidPeerIdError, RpcError
from lattica.identity import PeerId
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_client import RelayRefusedError
from lattica.net.address import InvalidAddressError, PeerAddr, format_host_port
from lattica.net.connection import Connection
from lattica.net.tcp_connection import TcpConnection
from lattica.net.tcp_lane import TcpLane
from lattica.node import Node

DialString = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DIAL_STRING_CHARS)]
_PING_BACKSTOP_S = 1.0  # the control method's limit beyond the ping's own timeout


class IdResult(msgspec.Struct):
    """``id``: who this node is and where it can be dialled."""

    peer_id: str
    addrs: list[str]


class StatusResult(msgspec.Struct):
    """``status``: identity, version, uptime, addresses, peers, and anything the owner should know."""

    peer_id: str
    version: str
    uptime_s: float
    listen_addrs: list[str]
    connected_peers: int
    warnings: list[str]
    """Conditions the owner should act on (e.g. a new identity over an old database)."""
    tcp_listen_addrs: list[str] = []
    """``PEERID@HOST:PORT`` where TLS-over-TCP is accepted (empty unless ``net.tcp_listen``)."""
    relayed_only_peers: int = 0
    """Connected peers reached only through a relay (no direct connection to them yet)."""
    quic: dict[str, int] = {}
    """The QUIC endpoint's counters (:class:`~lattica.net.endpoint.EndpointStats`: datagrams,
    drops, stateless resets sent, received and held back by the rate limit, ...)."""
    uploads: dict[str, int] = {}
    """Upload slots of the content exchange: ``held`` now, ``max`` (``content.max_uploads``),
    and ``preempted``: slots taken from a stream that moved too little for a peer that asked
    since start (empty without content)."""


class PeerRow(msgspec.Struct):
    """``peers``: one open connection."""

    peer_id: str
    remote_addr: str
    """The peer's address; for a relayed connection, the relay's."""
    rtt_ms: float | None
    direction: str
    path: str = "direct"
    """``direct``, or ``relayed`` through the relay named by ``via``."""
    via: str | None = None
    """The relay's peer id when ``path`` is ``relayed``."""
    connected_s: float = 0.0
    """Seconds since the connection was authenticated."""
    direct_after_s: float | None = None
    """For a direct connection that replaced a relayed one by hole punching: seconds from the
    relayed connection to the direct path; None otherwise."""
    transport: str = "quic"
    """``quic``, ``tcp`` for a TLS-over-TCP connection (bulk transfers, ``net.tcp_listen``), or
    ``tcp-lane`` for a lane: a TLS-over-TCP connection carrying one fetch's stream to or from
    that peer, open while the transfer runs."""


class PingParams(msgspec.Struct, forbid_unknown_fields=True):
    """``ping``: ``PEERID@HOST:PORT`` (identity checked), ``HOST:PORT``, a relayed address
    ``RELAYPEERID@HOST:PORT/relay/PEERID``, or a bare ``PEERID`` (found as
    :meth:`~lattica.node.Node.ping` says)."""

    addr: DialString
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_PING_TIMEOUT_S)] = 10.0


class PingResult(msgspec.Struct):
    """``ping``: who answered, in how long, over which address.

    ``addr`` is the remote address of the connection the ping used; ``reused_connection`` says
    whether that connection existed before this call (an explicit address is dialled unless the
    open connection is to exactly that address).
    """

    peer_id: str
    rtt_ms: float
    addr: str | None = None
    reused_connection: bool | None = None
    via: str | None = None
    """The relay's peer id when the ping went through a relay circuit."""


class ConnectParams(msgspec.Struct, forbid_unknown_fields=True):
    """``connect``: where to dial."""

    addr: DialString


class ConnectResult(msgspec.Struct):
    """``connect``: the connection that now exists."""

    peer_id: str
    remote_addr: str


def parse_peer_addr(text: str, *, field: str = "addr") -> PeerAddr:
    """``text`` as a dial string; raises :class:`ControlError` (``invalid-params``)."""
    try:
        return PeerAddr.parse(text)
    except InvalidAddressError as exc:
        raise ControlError(INVALID_PARAMS, f"{field}: {exc}", hint="use PEERID@HOST:PORT or HOST:PORT") from None


def parse_target(text: str, *, field: str = "addr") -> PeerAddr | RelayedAddr | PeerId:
    """A dial string, a relayed address or a bare peer id (reached through an open connection,
    known addresses, the DHT, or the relays its relayed-address record names); raises
    :class:`ControlError` (``invalid-params``)."""
    if "@" not in text and ":" not in text and "/" not in text:
        try:
            return PeerId.parse(text)
        except InvalidPeerIdError as exc:
            raise ControlError(
                INVALID_PARAMS, f"{field}: {exc}", hint="use PEERID, PEERID@HOST:PORT or HOST:PORT"
            ) from None
    if not RelayedAddr.looks_relayed(text):
        return parse_peer_addr(text, field=field)
    try:
        return RelayedAddr.parse(text)
    except InvalidAddressError as exc:
        raise ControlError(
            INVALID_PARAMS, f"{field}: {exc}", hint="use RELAYPEERID@HOST:PORT/relay/PEERID"
        ) from None


def _upload_counts(node: Node) -> dict[str, int]:
    if node.content is None:
        return {}
    slots = node.content.upload_slots
    return {"held": slots.held, "max": slots.max_uploads, "preempted": slots.preemptions}


def register_node_methods(registry: MethodRegistry, node: Node, *, warnings: list[str] | None = None) -> None:
    """Register the node's basic operations; ``warnings`` (shared, may grow) appear in ``status``."""
    owner_warnings = warnings if warnings is not None else []

    async def identify(_: NoParams) -> IdResult:
        return IdResult(peer_id=str(node.peer_id), addrs=node.dial_strings() + node.relay_client.relayed_addresses())

    async def status(_: NoParams) -> StatusResult:
        return StatusResult(
            peer_id=str(node.peer_id),
            version=__version__,
            uptime_s=round(node.uptime_s(), 3),
            listen_addrs=node.dial_strings(),
            connected_peers=len({c.peer_id for c in node.connections.connections()}),
            relayed_only_peers=_relayed_only_peers(node),
            warnings=list(owner_warnings),
            tcp_listen_addrs=[f"{node.peer_id}@{format_host_port(a)}" for a in node.tcp.listen_addresses],
            quic=dataclasses.asdict(node.endpoint.stats),
            uploads=_upload_counts(node),
        )

    async def peers(_: NoParams) -> list[PeerRow]:
        now = trio.current_time()
        return [
            PeerRow(
                peer_id=str(c.peer_id),
                remote_addr=format_host_port(c.remote_address),
                rtt_ms=None if c.rtt_s is None else round(c.rtt_s * 1000, 3),
                direction=c.direction,
                path="direct" if c.relayed_via is None else "relayed",
                via=None if c.relayed_via is None else str(c.relayed_via),
                connected_s=round(now - c.established_at, 3),
                direct_after_s=_direct_after_s(node, c),
            )
            for c in node.connections.connections()
        ] + [
            PeerRow(
                peer_id=str(c.peer_id),
                remote_addr=format_host_port(c.remote_address),
                rtt_ms=None,
                direction=c.direction,
                connected_s=round(now - c.established_at, 3),
                transport="tcp-lane" if isinstance(c, TcpLane) else "tcp",
            )
            for c in _tcp_carriers(node)
        ]

    async def ping(params: PingParams) -> PingResult:
        target = parse_target(params.addr)
        timed_out = ControlError(
            TIMEOUT,
            f"no answer from {params.addr} within {params.timeout_s:g} s",
            hint="check the address and that the peer's daemon runs and is reachable over UDP",
        )
        try:
            # A backstop only: Node.ping bounds itself, and its own timeout must be the one that
            # fires, so the RPC layer closes a connection that stayed silent (a peer that
            # restarted without a reset) and the next ping dials afresh (review finding: this
            # outer limit fired first, and every ping for ~60 s reused the dead connection).
            with trio.fail_after(params.timeout_s + _PING_BACKSTOP_S):
                result = await node.ping(target, timeout_s=params.timeout_s)
        except RpcError as exc:
            if exc.code == "timeout":
                raise timed_out from None
            raise
        except (trio.TooSlowError, ConnectTimeoutError):
            raise timed_out from None
        except DialSelfError:
            raise ControlError(FAILED, f"{params.addr} is this node's own address", hint="ping another node") from None
        except RelayRefusedError as exc:
            raise ControlError(
                FAILED,
                f"could not reach {params.addr}: {exc}",
                hint="the target must hold a reservation on that relay (`lattica relay reserve` on the target), "
                "and the relay must run with --relay-service",
            ) from None
        except ConnectError as exc:
            raise ControlError(
                FAILED,
                f"could not reach {params.addr}: {exc}",
                hint="check the address and that the peer's daemon runs and is reachable over UDP",
            ) from None
        return PingResult(
            peer_id=str(result.peer_id),
            rtt_ms=round(result.rtt_s * 1000, 3),
            addr=format_host_port(result.remote_address),
            reused_connection=result.reused_connection,
            via=None if result.relayed_via is None else str(result.relayed_via),
        )

    async def connect(params: ConnectParams) -> ConnectResult:
        connection = await node.connect(parse_peer_addr(params.addr))
        return ConnectResult(peer_id=str(connection.peer_id), remote_addr=format_host_port(connection.remote_address))

    registry.add("id", NoParams, identify)
    registry.add("status", NoParams, status)
    registry.add("peers", NoParams, peers)
    registry.add("ping", PingParams, ping)
    registry.add("connect", ConnectParams, connect)


def _direct_after_s(node: Node, connection: Connection) -> float | None:
    if connection.relayed_via is not None:
        return None
    seconds = node.hole_punch.direct_after_s(connection.peer_id)
    return None if seconds is None else round(seconds, 3)


def _relayed_only_peers(node: Node) -> int:
    """Peers whose every open connection runs through a relay."""
    paths: dict[object, set[bool]] = {}
    for connection in node.connections.connections():
        paths.setdefault(connection.peer_id, set()).add(connection.relayed_via is not None)
    return sum(1 for relayed in paths.values() if relayed == {True})


def _tcp_carriers(node: Node) -> list[TcpConnection | TcpLane]:
    """The node's TLS-over-TCP connections and lanes, for ``peers``."""
    return [*node.tcp.connections(), *node.tcp.lanes()]
