"""``RelayClient``: this node's side of circuit relay -- reservations on relays, circuits to
peers through relays, and QUIC through those circuits.

* **Reservations.** With relays configured (``nat.relay.relays``) or added
  (:meth:`RelayClient.add_relay`), the client keeps a reservation on up to
  ``nat.relay.reservations`` of them. Each reservation is one task holding the relay's
  reservation stream open (the relay releases it when the stream ends) and renewing it at half
  its remaining lifetime. A relay that refuses, fails or vanishes (its connection is lost) is
  dropped and retried after ``retry_s``; another known relay takes its place at once.
* **Relayed addresses.** For each reservation, :meth:`RelayClient.relayed_addresses` gives
  ``RELAYPEERID@HOST:PORT/relay/OURPEERID`` (:mod:`lattica.nat.relay_address`).
* **Circuits.** :meth:`RelayClient.connect` asks a relay for a circuit to a target and then runs
  an ordinary QUIC handshake through it: the circuit is registered with the endpoint as a
  virtual path (:class:`~lattica.net.relayed_path.RelayedPath`), so the target's peer id is
  proven end to end and the relay sees only ciphertext. A target accepts a circuit (``STOP``)
  only from a relay it holds a reservation on; the Initial that arrives through it creates an
  ordinary inbound connection on the virtual path.
* **Circuit pump.** One task per circuit: datagrams for the path go into a bounded queue (full:
  dropped, as UDP would; the endpoint never waits for a circuit) and are written as circuit
  frames; frames read from the stream are delivered to the endpoint. When the stream ends (the
  relay closed it at a limit, or either end finished), the path is closed and the connections on
  it end. Either end closes its circuit when the connection on it closes, or when no
  connection authenticated on it within the endpoint's ``handshake_timeout_s``.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import trio

from lattica.errors import ConnectError, LatticaError, RemoteProtocolError, RpcError
from lattica.identity import PeerId
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_config import RelayConfig
from lattica.nat.relay_messages import (
    HOP_PROTOCOL,
    STOP_PROTOCOL,
    CircuitDecoder,
    CircuitLimits,
    Connect,
    Connected,
    Refused,
    Reserve,
    Reserved,
    StopAccepted,
    StopConnect,
    encode_circuit_frames,
    peer_id_from_wire,
    refused,
)
from lattica.nat.relay_stream import receive_hop_message, receive_stop_message, send_relay_message
from lattica.net.address import PeerAddr
from lattica.net.connection import Connection
from lattica.net.endpoint import Endpoint
from lattica.net.relayed_path import RelayedPath
from lattica.net.rpc import Rpc
from lattica.net.stream import QuicStream

log = logging.getLogger("lattica.nat.relay")

CIRCUIT_QUEUE_DATAGRAMS = 256
"""Datagrams waiting to enter one circuit; more are dropped (QUIC retransmits)."""


class RelayRefusedError(ConnectError):
    """A relay (or the target behind it) refused a reservation or circuit; ``code`` is the
    wire's refusal code (:data:`~lattica.nat.relay_messages.RefusalCode`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"relay refused ({code}): {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class RelayReservation:
    """A reservation this node holds on a relay."""

    relay: PeerAddr
    """The relay, with its peer id."""
    expires_at: float
    """When it runs out unless renewed (``trio.current_time()``)."""
    limits: CircuitLimits
    """What each circuit through it may carry."""
    renewals: int
    """How many times it was renewed."""


@dataclass
class RelayClientStats:
    """Counters of the relay client (monotonic)."""

    reservations_made: int = 0
    reservations_renewed: int = 0
    reservations_lost: int = 0
    circuits_dialled: int = 0
    circuits_accepted: int = 0
    circuit_datagrams_dropped: int = 0
    """Datagrams dropped because a circuit's queue was full or it was closing."""


class RelayClient:
    """Reservations on relays, relayed addresses, and QUIC connections through circuits.

    Construction registers the STOP handler on ``rpc``; :meth:`run` (``nursery.start``) keeps
    the configured reservations and hosts circuit tasks until cancelled.
    """

    def __init__(self, endpoint: Endpoint, rpc: Rpc, config: RelayConfig) -> None:
        self.config = config
        self.stats = RelayClientStats()
        self._endpoint = endpoint
        self._rpc = rpc
        self._relays: list[PeerAddr] = config.relay_addresses()
        self._reservations: dict[PeerId, RelayReservation] = {}
        self._holding: set[PeerId] = set()
        self._retry_at: dict[PeerId, float] = {}
        self._changed = trio.lowlevel.ParkingLot()
        self._circuit_ids = itertools.count(1)
        self._circuits: dict[RelayedPath, trio.CancelScope] = {}
        self._connected_paths: set[RelayedPath] = set()
        """Circuits that carried an authenticated connection."""
        self._nursery: trio.Nursery | None = None
        rpc.add_stream_handler(STOP_PROTOCOL, self._serve_stop)
        rpc.manager.on_connected(self._close_circuit_with)

    @property
    def peer_id(self) -> PeerId:
        """This node's peer id."""
        return self._endpoint.peer_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep reservations and host circuits until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keep_reservations)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- reservations ---------------------------------------------------------------------

    def add_relay(self, relay: PeerAddr) -> None:
        """Consider ``relay`` (with its peer id) for reservations. Raises ``ValueError`` without
        a peer id."""
        if relay.peer_id is None:
            raise ValueError("a relay is added with its peer id")
        if relay not in self._relays and relay.peer_id != self.peer_id:
            self._relays.append(relay)
            self._changed.unpark_all()

    async def reserve(self, relay: PeerAddr) -> RelayReservation:
        """Hold a reservation on ``relay`` now (beyond ``reservations`` if need be: we were told
        to) and return it once the relay granted it. Waits through refusals and retries
        (``retry_s``); bound it with a cancel scope. Raises ``ValueError`` without a peer id,
        :class:`~lattica.errors.ConnectError` when the client is not running."""
        self.add_relay(relay)
        relay_id = relay.peer_id
        assert relay_id is not None
        while (held := self._reservations.get(relay_id)) is None:
            if self._nursery is None:
                raise ConnectError("the relay client is not running")
            wake_at = math.inf
            if relay_id not in self._holding:
                retry_at = self._retry_at.get(relay_id, -math.inf)
                if retry_at <= trio.current_time():
                    self._holding.add(relay_id)
                    self._nursery.start_soon(self._hold_reservation, relay)
                else:
                    wake_at = retry_at
            # Woken by the attempt's outcome, or when a failed relay may be asked again.
            with trio.move_on_at(wake_at):
                await self._changed.park()
        return held

    def reservations(self) -> list[RelayReservation]:
        """Reservations held now."""
        return list(self._reservations.values())

    def relayed_addresses(self) -> list[str]:
        """``RELAYPEERID@HOST:PORT/relay/OURPEERID`` for each reservation held."""
        return [str(RelayedAddr(r.relay, self.peer_id)) for r in self._reservations.values()]

    async def wait_reservations(self, count: int = 1) -> None:
        """Wait until at least ``count`` reservations are held."""
        while len(self._reservations) < count:
            await self._changed.park()

    async def wait_changed(self) -> None:
        """Wait until a reservation or circuit is made, renewed or lost, or a relay is added."""
        await self._changed.park()

    async def _keep_reservations(self) -> None:
        assert self._nursery is not None
        while True:
            now = trio.current_time()
            wake_at = math.inf
            for relay in self._relays:
                if len(self._holding) >= self.config.reservations:
                    break
                assert relay.peer_id is not None
                if relay.peer_id in self._holding:
                    continue
                retry_at = self._retry_at.get(relay.peer_id, -math.inf)
                if retry_at > now:
                    wake_at = min(wake_at, retry_at)
                    continue
                self._holding.add(relay.peer_id)
                self._nursery.start_soon(self._hold_reservation, relay)
            with trio.move_on_at(wake_at):
                await self._changed.park()

    async def _hold_reservation(self, relay: PeerAddr) -> None:
        assert relay.peer_id is not None
        relay_id = relay.peer_id
        try:
            connection = await self._rpc.manager.connect(relay, timeout_s=self.config.request_timeout_s)
            stream = await self._rpc.open_stream(connection, HOP_PROTOCOL)
            async with stream:
                renewals = 0
                while True:
                    with trio.fail_after(self.config.request_timeout_s):
                        await send_relay_message(stream, Reserve())
                        answer = await receive_hop_message(stream)
                    if isinstance(answer, Refused):
                        raise RelayRefusedError(answer.code, answer.message)
                    if not isinstance(answer, Reserved):
                        raise RemoteProtocolError(f"relay answered reserve with {type(answer).__name__}")
                    now = trio.current_time()
                    self._reservations[relay_id] = RelayReservation(relay, now + answer.ttl_s, answer.limits, renewals)
                    if renewals:
                        self.stats.reservations_renewed += 1
                    else:
                        self.stats.reservations_made += 1
                        log.info("reserved a relay slot on %s for %.0f s", relay, answer.ttl_s)
                    self._changed.unpark_all()
                    # Renew at half the lifetime; the relay's end of the stream ending (or the
                    # connection being lost) wakes us at once.
                    with trio.move_on_after(answer.ttl_s / 2):
                        extra = await stream.receive_some(1)
                        if extra:
                            raise RemoteProtocolError("relay sent data on a reservation stream")
                        raise trio.BrokenResourceError("the relay ended the reservation")
                    renewals += 1
        except (LatticaError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("relay %s: reservation ended: %s", relay, exc)
        finally:
            if self._reservations.pop(relay_id, None) is not None:
                self.stats.reservations_lost += 1
            self._holding.discard(relay_id)
            self._retry_at[relay_id] = trio.current_time() + self.config.retry_s
            self._changed.unpark_all()

    # -- circuits -------------------------------------------------------------------------

    async def connect(self, address: RelayedAddr, *, timeout_s: float | None = None) -> Connection:
        """A QUIC connection to ``address.target`` through a new circuit on ``address.relay``.

        Raises :class:`RelayRefusedError` (the relay or the target refused, with the code),
        :class:`~lattica.errors.ConnectError` (relay unreachable, timeout) or
        :class:`~lattica.errors.PeerIdMismatchError` (someone else answered through the circuit).
        """
        nursery = self._nursery
        if nursery is None:
            raise ConnectError("the relay client is not running")
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        relay_id = address.relay.peer_id
        assert relay_id is not None
        try:
            with trio.fail_after(timeout):
                relay_connection = await self._rpc.manager.connect(address.relay)
                stream = await self._rpc.open_stream(relay_connection, HOP_PROTOCOL)
                try:
                    await send_relay_message(stream, Connect(target=address.target.key))
                    answer = await receive_hop_message(stream)
                    if isinstance(answer, Refused):
                        raise RelayRefusedError(answer.code, answer.message)
                    if not isinstance(answer, Connected):
                        raise ConnectError(f"relay {address.relay} answered connect with {type(answer).__name__}")
                    path = RelayedPath(relay_id, relay_connection.remote_address, next(self._circuit_ids))
                    await nursery.start(self._run_circuit, stream, path)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    raise
                self.stats.circuits_dialled += 1
                try:
                    connection = await self._endpoint.connect(path, expected_peer=address.target)
                except BaseException:
                    self._close_circuit(path)
                    raise
                return connection
        except trio.TooSlowError:
            raise ConnectError(f"no circuit to {address} within {timeout:g} s") from None
        except RpcError as exc:
            raise ConnectError(f"relay {address.relay}: {exc}") from exc
        except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectError(f"relay {address.relay} failed: {exc}") from exc

    async def _serve_stop(self, stream: QuicStream, relay_id: PeerId) -> None:
        try:
            with trio.fail_after(self.config.request_timeout_s):
                request = await receive_stop_message(stream)
        except (trio.TooSlowError, RemoteProtocolError) as exc:
            log.debug("dropping a stop stream from %s: %r", relay_id, exc)
            return
        reservation = self._reservations.get(relay_id)
        if not isinstance(request, StopConnect):
            await _refuse_stop(stream, refused("unexpected-message", "expected stop-connect"))
            return
        if reservation is None:
            # Circuits come only through relays we chose: anyone else could make us spend a
            # QUIC handshake per stream.
            await _refuse_stop(stream, refused("no-reservation", "no reservation on you"))
            return
        if len(self._circuits) >= self.config.max_circuits:
            await _refuse_stop(stream, refused("resource-limit", "too many circuits"))
            return
        through = sum(path.relay_peer_id == relay_id for path in self._circuits)
        if through >= self.config.max_circuits_per_relay:
            # A hostile relay could fill every circuit with peer ids it minted (review).
            await _refuse_stop(stream, refused("resource-limit", "too many circuits through this relay"))
            return
        connection = self._rpc.manager.connection(relay_id)
        if connection is None:
            return
        await send_relay_message(stream, StopAccepted())
        self.stats.circuits_accepted += 1
        path = RelayedPath(relay_id, connection.remote_address, next(self._circuit_ids))
        log.debug("accepted circuit %r from %s", path, peer_id_from_wire(request.source))
        await self._run_circuit(stream, path)

    async def _close_circuit_with(self, connection: Connection) -> None:
        """A circuit lives as long as the connection on it (the manager runs this for every
        new connection): our end finishing the circuit tells the relay, which finishes the other
        end's."""
        path = connection.path
        if not isinstance(path, RelayedPath) or path not in self._circuits:
            return
        self._connected_paths.add(path)
        await connection.wait_closed()
        self._close_circuit(path)

    async def _close_circuit_without_handshake(self, path: RelayedPath) -> None:
        # A circuit that carries no authenticated connection within a handshake's time only
        # holds a slot here and at the relay.
        await trio.sleep(self._endpoint.config.handshake_timeout_s)
        if path not in self._connected_paths:
            log.debug("closing circuit %r: no connection on it", path)
            self._close_circuit(path)

    def _close_circuit(self, path: RelayedPath) -> None:
        scope = self._circuits.get(path)
        if scope is not None:
            scope.cancel()

    def circuit_count(self) -> int:
        """Circuits open at this node (dialled and accepted)."""
        return len(self._circuits)

    async def _run_circuit(
        self, stream: QuicStream, path: RelayedPath, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Pump datagrams between ``path`` and ``stream`` until either ends; owns ``stream``."""
        send_channel, receive_channel = trio.open_memory_channel[bytes](CIRCUIT_QUEUE_DATAGRAMS)
        stats = self.stats

        def send(datagram: bytes) -> None:
            try:
                send_channel.send_nowait(datagram)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                stats.circuit_datagrams_dropped += 1

        self._endpoint.open_virtual_path(path, send)
        scope = trio.CancelScope()
        self._circuits[path] = scope
        self._changed.unpark_all()
        task_status.started()
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_circuit, nursery.cancel_scope, stream, receive_channel)
                    nursery.start_soon(self._close_circuit_without_handshake, path)
                    await self._read_circuit(stream, path)
                    nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as exc:
            log.debug("circuit %r ended: %r", path, exc)
        finally:
            del self._circuits[path]
            self._connected_paths.discard(path)
            self._changed.unpark_all()
            send_channel.close()
            with trio.CancelScope(shield=True):
                await self._endpoint.close_virtual_path(path)
                await stream.aclose()

    async def _read_circuit(self, stream: QuicStream, path: RelayedPath) -> None:
        decoder = CircuitDecoder()
        while True:
            data = await stream.receive_some()
            if not data:
                return
            datagrams = decoder.feed(data)
            if datagrams:
                await self._endpoint.receive_virtual(path, datagrams)

    async def _write_circuit(
        self, scope: trio.CancelScope, stream: QuicStream, queue: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        try:
            async for datagram in queue:
                batch = [datagram]
                while len(batch) < CIRCUIT_QUEUE_DATAGRAMS:
                    try:
                        batch.append(queue.receive_nowait())
                    except trio.WouldBlock:
                        break
                await stream.send_all(encode_circuit_frames(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


async def _refuse_stop(stream: QuicStream, refusal: Refused) -> None:
    # FIN after the refusal: closing the stream unfinished would reset it, and the reset can
    # overtake the refusal.
    await send_relay_message(stream, refusal)
    await stream.send_eof()
