"""``HolePunchService``: the trio driver of :mod:`lattica.nat.hole_punch` (DCUtR-style upgrade
of a relayed connection to a direct one).

* **Who starts.** When a relayed connection comes up, the side that *accepted* it (the node
  behind a NAT that others reach through its relay) is the initiator: it opens a
  :data:`~lattica.nat.hole_punch.PROTOCOL_ID` stream on that connection and runs the exchange.
  The dialling side answers as the responder (a stream handler). The messages travel over the
  relayed connection, so both ends are already authenticated.
* **Candidates.** Each side offers its observed addresses (believed ones first, else the most
  reported: :meth:`~lattica.nat.observed.ObservedAddressBook.candidates`) and then its listen
  addresses, at most :data:`~lattica.nat.hole_punch.MAX_PUNCH_ADDRESSES`.
* **Actions.** Punches are STUN Binding requests sent from the node's socket (queued through
  :meth:`~lattica.nat.service.NatService.queue_raw`, never blocking); a direct dial races QUIC
  dials to every candidate of the peer (``expected_peer`` set, so only the peer itself counts).
  A direct connection is recognised when the connection manager reports a new authenticated
  connection to that peer that is not relayed -- in either direction: the initiator sees the
  responder's dial arrive, the responder its own dial complete.
* **Path policy.** New streams prefer the direct connection
  (:meth:`~lattica.net.manager.ConnectionManager.connection`); the relayed connection stays
  until it has no open streams, then this service closes it (the circuit closes with it).
  The time from the relayed connection's establishment to the direct path is kept in
  :meth:`HolePunchService.direct_after_s`.
* **Bounds.** One attempt per peer at a time, at most ``max_concurrent`` attempts at once, and a
  peer whose attempt failed is tried again only after ``retry_after_s`` or when our own observed
  addresses changed (:meth:`HolePunchService.addresses_changed`). A responder refuses (closes
  the stream) an exchange on a direct connection, a second concurrent one from the same peer,
  or one beyond ``max_concurrent``; a peer that breaks the protocol ends its own attempt only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from lattica.errors import LatticaError, RemoteProtocolError
from lattica.identity import PeerId
from lattica.nat import hole_punch
from lattica.nat.hole_punch import (
    MAX_MESSAGE_BYTES,
    MAX_PUNCH_ADDRESSES,
    PROTOCOL_ID,
    DialDirect,
    HolePunch,
    HolePunchDecodeError,
    HolePunchMessage,
    PunchFailed,
    PunchSucceeded,
    Role,
    SendMessage,
    SendPunches,
)
from lattica.nat.hole_punch_config import HolePunchConfig
from lattica.nat.observed import ObservedAddressBook
from lattica.nat.service import NatService
from lattica.nat.stun import encode_binding_request, new_transaction_id
from lattica.net.connection import Connection
from lattica.net.datagram import Address
from lattica.net.rpc import Rpc
from lattica.net.stream import QuicStream, TruncatedFrameError, receive_exactly, receive_exactly_or_eof

log = logging.getLogger("lattica.nat.hole_punch")

_V = TypeVar("_V")
_LENGTH = struct.Struct(">H")
_MAX_REMEMBERED_PEERS = 1024
"""Peers whose relayed-connection time is kept for a late direct connection."""
_IDLE_CHECK_S = 1.0
"""How often a superseded relayed connection is checked for open streams (seconds)."""


@dataclass
class HolePunchStats:
    """Counters of the hole-punching driver (monotonic)."""

    attempts: int = 0
    succeeded: int = 0
    failed: int = 0
    refused: int = 0
    """Exchanges a peer started that we refused (busy, not relayed, already running)."""
    protocol_errors: int = 0
    punches_sent: int = 0
    relayed_closed: int = 0
    """Relayed connections closed because a direct one took over."""


_InboxItem = HolePunchMessage | Connection | RemoteProtocolError | trio.BrokenResourceError | trio.ClosedResourceError


@dataclass
class _Attempt:
    peer_id: PeerId
    machine: HolePunch
    relayed: Connection
    inbox: trio.MemorySendChannel[_InboxItem]
    """Messages from the peer, direct connections that came up, or the error that ended the
    hole-punching stream."""


class HolePunchService:
    """Drives hole punching for one node (see the module docstring).

    ``own_addresses()`` gives the node's listen addresses; ``book`` its observed-address book;
    ``config`` the ``[nat.hole_punch]`` settings (with ``enabled`` off the service starts no
    attempt and refuses every exchange). Construction registers the stream handler and the
    connection hooks on ``rpc``; :meth:`run` (``nursery.start``) hosts the attempts until
    cancelled.
    """

    def __init__(
        self,
        rpc: Rpc,
        nat: NatService,
        book: ObservedAddressBook,
        own_addresses: Callable[[], list[Address]],
        *,
        random_bytes: Callable[[int], bytes],
        config: HolePunchConfig | None = None,
    ) -> None:
        config = config or HolePunchConfig()
        self.config = config
        self.stats = HolePunchStats()
        self._rpc = rpc
        self._nat = nat
        self._book = book
        self._own_addresses = own_addresses
        self._random_bytes = random_bytes
        self._rounds = config.rounds
        self._round_timeout_s = config.round_timeout_s
        self._retry_after_s = config.retry_after_s
        self._max_concurrent = config.max_concurrent
        self._attempts: dict[PeerId, _Attempt] = {}
        self._starting: set[PeerId] = set()
        """Peers we initiate with, from the check until the attempt ended."""
        self._failed_at: dict[PeerId, tuple[float, frozenset[Address]]] = {}
        self._direct_after_s: dict[PeerId, float] = {}
        self._relayed_at: dict[PeerId, float] = {}
        """When the relayed connection of each peer's latest attempt came up (bounded)."""
        self._changed = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        rpc.add_stream_handler(PROTOCOL_ID, self._serve)
        rpc.manager.on_connected(self._connected)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host attempts until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- public state ---------------------------------------------------------------------

    def direct_after_s(self, peer_id: PeerId) -> float | None:
        """Seconds from the relayed connection to the direct path, for the latest successful
        upgrade with ``peer_id`` (None if there was none)."""
        return self._direct_after_s.get(peer_id)

    def active(self) -> list[PeerId]:
        """Peers with an attempt running now."""
        return list(self._attempts)

    async def wait_changed(self) -> None:
        """Wait until an attempt starts or ends."""
        await self._changed.park()

    def addresses_changed(self) -> None:
        """Our observed addresses changed: relayed peers whose attempt failed are tried again
        (called by the node on every change of the believed address set)."""
        self._failed_at.clear()
        nursery = self._nursery
        if nursery is None:
            return
        for connection in self._rpc.manager.connections():
            if self._should_initiate(connection):
                nursery.start_soon(self._initiate, connection)

    # -- starting attempts ----------------------------------------------------------------

    def _candidates(self) -> list[Address]:
        observed = self._book.candidates(trio.current_time(), limit=MAX_PUNCH_ADDRESSES)
        ordered = dict.fromkeys([*observed, *self._own_addresses()])
        return list(ordered)[:MAX_PUNCH_ADDRESSES]

    def _should_initiate(self, connection: Connection) -> bool:
        if not self.config.enabled or connection.is_closed:
            return False
        if connection.relayed_via is None or connection.direction != "inbound":
            return False
        peer = connection.peer_id
        if peer in self._attempts or peer in self._starting:
            return False
        if len(self._starting.union(self._attempts)) >= self._max_concurrent:
            return False
        direct = self._rpc.manager.connection(peer)
        if direct is not None and direct.relayed_via is None:
            return False
        failed = self._failed_at.get(peer)
        if failed is not None:
            at, candidates = failed
            if trio.current_time() - at < self._retry_after_s and candidates == frozenset(self._candidates()):
                return False
        return True

    async def _connected(self, connection: Connection) -> None:
        attempt = self._attempts.get(connection.peer_id)
        if connection.relayed_via is None:
            if attempt is not None:
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    attempt.inbox.send_nowait(connection)
            elif (relayed_at := self._relayed_at.pop(connection.peer_id, None)) is not None:
                # The direct connection finished its handshake here after the attempt ended
                # (typically the peer saw it first and closed the relayed connection): it still
                # is the upgrade.
                _remember(self._direct_after_s, connection.peer_id, trio.current_time() - relayed_at)
                self._changed.unpark_all()
                for relayed in self._rpc.manager.connections():
                    ours = relayed.direction == "inbound" and relayed.peer_id == connection.peer_id
                    if ours and relayed.relayed_via is not None and self._nursery is not None:
                        self._nursery.start_soon(self._close_when_idle, relayed)
            await trio.lowlevel.checkpoint()
            return
        if self._should_initiate(connection):
            await self._initiate(connection)

    async def _initiate(self, relayed: Connection) -> None:
        if not self._should_initiate(relayed):
            await trio.lowlevel.checkpoint()
            return
        machine = HolePunch(
            Role.INITIATOR,
            self._candidates(),
            rounds=self._rounds,
            round_timeout_s=self._round_timeout_s,
            first_contact_at=relayed.established_at,
        )
        # Held until the attempt ends: opening the stream waits, and another trigger (a new
        # connection, an address change) must not start a second attempt meanwhile.
        self._starting.add(relayed.peer_id)
        try:
            try:
                stream = await self._rpc.open_stream(relayed, PROTOCOL_ID)
            except LatticaError as exc:
                log.debug("cannot start hole punching with %s: %s", relayed.peer_id, exc)
                return
            async with stream:
                await self._run_attempt(machine, relayed, stream)
        finally:
            self._starting.discard(relayed.peer_id)

    async def _serve(self, stream: QuicStream, peer_id: PeerId) -> None:
        connection = stream.connection
        if (
            not self.config.enabled
            or not isinstance(connection, Connection)
            or connection.relayed_via is None
            or peer_id in self._attempts
            or peer_id in self._starting
            or len(self._starting.union(self._attempts)) >= self._max_concurrent
        ):
            # Refusal: the stream is finished without an answer (FIN, not a reset, so it is
            # told apart from a failure); the initiator's attempt ends.
            self.stats.refused += 1
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_eof()
            return
        machine = HolePunch(
            Role.RESPONDER,
            self._candidates(),
            rounds=self._rounds,
            round_timeout_s=self._round_timeout_s,
            first_contact_at=connection.established_at,
        )
        await self._run_attempt(machine, connection, stream)

    # -- one attempt ----------------------------------------------------------------------

    async def _run_attempt(self, machine: HolePunch, relayed: Connection, stream: QuicStream) -> None:
        peer = relayed.peer_id
        # Bounded: messages are few (one per round each way) and direct connections rarer.
        inbox_send, inbox = trio.open_memory_channel[_InboxItem](16)
        attempt = _Attempt(peer, machine, relayed, inbox_send)
        self._attempts[peer] = attempt
        _remember(self._relayed_at, peer, relayed.established_at)
        self.stats.attempts += 1
        self._changed.unpark_all()
        outcome: PunchSucceeded | PunchFailed | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_messages, stream, inbox_send)
                try:
                    outcome = await self._drive(attempt, stream, inbox, nursery)
                except RemoteProtocolError as exc:
                    self.stats.protocol_errors += 1
                    outcome = PunchFailed(machine.round, f"protocol error: {exc}")
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    outcome = PunchFailed(machine.round, f"the relayed connection ended: {exc!r}")
                nursery.cancel_scope.cancel()
        finally:
            del self._attempts[peer]
            self._changed.unpark_all()
        if isinstance(outcome, PunchSucceeded):
            self.stats.succeeded += 1
            _remember(self._direct_after_s, peer, outcome.time_to_direct_s)
            self._relayed_at.pop(peer, None)
            self._failed_at.pop(peer, None)
            log.info(
                "direct path to %s at %s after %.3f s (%d round(s))",
                peer,
                outcome.address,
                outcome.time_to_direct_s,
                outcome.rounds,
            )
            # The initiator closes the relayed connection: the responder's direct dial may
            # complete at the responder before the initiator sees it, and closing then would end
            # the initiator's attempt first.
            if self._nursery is not None and machine.role is Role.INITIATOR:
                self._nursery.start_soon(self._close_when_idle, relayed)
        else:
            self.stats.failed += 1
            _remember(self._failed_at, peer, (trio.current_time(), frozenset(self._candidates())))
            log.info("no direct path to %s: %s", peer, outcome.reason if outcome else "cancelled")

    async def _drive(
        self,
        attempt: _Attempt,
        stream: QuicStream,
        inbox: trio.MemoryReceiveChannel[_InboxItem],
        nursery: trio.Nursery,
    ) -> PunchSucceeded | PunchFailed:
        """Feed the machine until it finishes. Raises RemoteProtocolError for a peer breaking
        the protocol, trio's stream errors when the relayed connection goes."""
        machine = attempt.machine
        pending: list[hole_punch.Action | hole_punch.Event] = []
        if machine.role is Role.INITIATOR:
            pending.extend(machine.start(trio.current_time()))
        while True:
            for item in pending:
                outcome = await self._act(item, attempt, stream, nursery)
                if outcome is not None:
                    return outcome
            deadline = machine.next_timer()
            received: _InboxItem | _Timer = _TIMER
            with trio.move_on_at(math.inf if deadline is None else deadline):
                received = await inbox.receive()
            now = trio.current_time()
            if isinstance(received, _Timer):
                pending = list(machine.handle_timer(now))
            elif isinstance(received, Connection):
                pending = list(machine.direct_path_established(received.remote_address, now))
            elif isinstance(received, BaseException):
                raise received
            else:
                pending = list(machine.receive_message(received, now))

    async def _act(
        self,
        item: hole_punch.Action | hole_punch.Event,
        attempt: _Attempt,
        stream: QuicStream,
        nursery: trio.Nursery,
    ) -> PunchSucceeded | PunchFailed | None:
        match item:
            case SendMessage(message=message):
                await stream.send_all(encode_message_frame(message))
            case SendPunches(addresses=addresses):
                for address in addresses:
                    request = encode_binding_request(new_transaction_id(self._random_bytes))
                    if self._nat.queue_raw(request, address):
                        self.stats.punches_sent += 1
            case DialDirect(addresses=addresses):
                for address in addresses:
                    nursery.start_soon(self._dial, attempt, address)
            case PunchSucceeded() | PunchFailed():
                return item
        return None

    async def _dial(self, attempt: _Attempt, address: Address) -> None:
        # The result comes back through the manager's on_connected hook, like an inbound one.
        if address in self._own_addresses():
            # The peer's LAN address can equal ours (two home networks alike): that dial would
            # only reach ourselves.
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._rpc.manager.endpoint.connect(
                address, expected_peer=attempt.peer_id, timeout_s=self._round_timeout_s
            )
        except LatticaError as exc:
            log.debug("direct dial to %s at %s failed: %s", attempt.peer_id, address, exc)

    @staticmethod
    async def _read_messages(stream: QuicStream, inbox: trio.MemorySendChannel[_InboxItem]) -> None:
        # Errors go to the driver as items: a bad peer ends its attempt, not the nursery. The end
        # of the stream is not a failure: a direct path may still be on its way; the machine's
        # timers end the attempt otherwise.
        try:
            while (message := await receive_message_frame(stream)) is not None:
                await inbox.send(message)
        except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await inbox.send(exc)

    async def _close_when_idle(self, relayed: Connection) -> None:
        # New streams already go to the direct connection; the relayed one ends once the streams
        # that were on it finish (the circuit closes with it).
        while not relayed.is_closed:
            if relayed.open_stream_count == 0:
                await relayed.aclose("superseded by a direct connection")
                self.stats.relayed_closed += 1
                return
            await trio.sleep(_IDLE_CHECK_S)


def _remember(table: dict[PeerId, _V], peer: PeerId, value: _V) -> None:
    """Set ``table[peer]`` as the newest entry, dropping the oldest beyond the bound."""
    table.pop(peer, None)
    table[peer] = value
    while len(table) > _MAX_REMEMBERED_PEERS:
        del table[next(iter(table))]


class _Timer:
    pass


_TIMER = _Timer()


def encode_message_frame(message: HolePunchMessage) -> bytes:
    """One message as it goes on the stream: a 2-byte big-endian length, then the message."""
    body = hole_punch.encode_message(message)
    return _LENGTH.pack(len(body)) + body


async def receive_message_frame(stream: QuicStream) -> HolePunchMessage | None:
    """The next message on ``stream``, or None when it ended cleanly between messages.

    Raises :class:`~lattica.nat.hole_punch.HolePunchDecodeError` for a frame over
    :data:`~lattica.nat.hole_punch.MAX_MESSAGE_BYTES`, a truncated or invalid one; trio's
    stream errors for a broken stream."""
    try:
        prefix = await receive_exactly_or_eof(stream, _LENGTH.size, what="a hole-punching frame")
        if prefix is None:
            return None
        (length,) = _LENGTH.unpack(prefix)
        if length > MAX_MESSAGE_BYTES:
            raise HolePunchDecodeError(f"hole-punching frame of {length} bytes (limit {MAX_MESSAGE_BYTES})")
        body = await receive_exactly(stream, length, what="a hole-punching frame")
    except TruncatedFrameError as exc:
        raise HolePunchDecodeError(str(exc)) from exc
    return hole_punch.decode_message(body)
