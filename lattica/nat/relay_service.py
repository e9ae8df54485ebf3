"""``RelayService``: the relay side of circuit relay (the trio driver of
:class:`~lattica.nat.relay_book.RelayBook`).

It serves ``/lattica/relay/hop/1`` streams (:mod:`lattica.nat.relay_messages`): a reservation
stream stays open for the reservation's life (its end releases the reservation); a connect
stream becomes one side of a circuit once the target accepted over its own reserved connection
(``/lattica/relay/stop/1``). The two streams are then spliced: bytes are copied both ways,
never parsed (they are the ends' QUIC ciphertext), counted against the circuit's limits, and
both streams are finished cleanly (FIN) when a limit is reached, either end finishes, or the
circuit's time is up.

Bounds: a stream that sends no valid first frame within ``request_timeout_s`` is dropped; each
frame is at most ``MAX_RELAY_FRAME_BYTES``; reservations and circuits are capped globally, per
IP and per peer by the book; a target that does not answer STOP within ``request_timeout_s``
fails the circuit. A node without ``service`` refuses every request (``service-disabled``).
Whatever one peer sends ends at most its own stream or circuit.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import trio

from lattica.errors import LocalProtocolError, RemoteProtocolError, RpcError
from lattica.identity import PeerId
from lattica.nat.relay_book import Circuit, Direction, Refusal, RelayBook
from lattica.nat.relay_config import RelayConfig
from lattica.nat.relay_messages import (
    HOP_PROTOCOL,
    STOP_PROTOCOL,
    Connect,
    Connected,
    RefusalCode,
    Reserve,
    Reserved,
    StopAccepted,
    StopConnect,
    peer_id_from_wire,
    refused,
)
from lattica.nat.relay_stream import receive_hop_message, receive_stop_message, send_relay_message
from lattica.net.address import address_group
from lattica.net.rpc import Rpc
from lattica.net.stream import QuicStream

log = logging.getLogger("lattica.nat.relay")

_SPLICE_CHUNK_BYTES = 64 * 1024


@dataclass
class RelayServiceStats:
    """Counters of the relay service (monotonic)."""

    reservations_granted: int = 0
    reservations_renewed: int = 0
    circuits_opened: int = 0
    circuits_closed_by_limit: int = 0
    """Circuits closed because their byte limit or duration ran out."""
    bytes_forwarded: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    """Refusals sent, by code."""

    def refused(self, code: RefusalCode) -> None:
        """Count one refusal by code."""
        self.refusals[code] = self.refusals.get(code, 0) + 1


class RelayService:
    """Relay reservations and circuits for other peers, within ``config``'s caps.

    It registers its HOP handler on ``rpc`` at construction; with ``config.service`` off every
    request is refused with ``service-disabled``.
    """

    def __init__(self, rpc: Rpc, config: RelayConfig) -> None:
        self.config = config
        self.book = RelayBook(config)
        self.stats = RelayServiceStats()
        self._rpc = rpc
        self._changed = trio.lowlevel.ParkingLot()
        rpc.add_stream_handler(HOP_PROTOCOL, self._serve_hop)

    async def wait_changed(self) -> None:
        """Wait until a reservation or circuit is granted, renewed, refused or ends."""
        await self._changed.park()

    @property
    def enabled(self) -> bool:
        """True if this node offers reservations and circuits."""
        return self.config.service

    async def _refuse(self, stream: QuicStream, code: RefusalCode, message: str) -> None:
        self.stats.refused(code)
        self._changed.unpark_all()
        log.debug("relay refusal %s: %s", code, message)
        with trio.move_on_after(self.config.request_timeout_s):
            await send_relay_message(stream, refused(code, message))
            await stream.send_eof()

    async def _serve_hop(self, stream: QuicStream, peer: PeerId) -> None:
        try:
            with trio.fail_after(self.config.request_timeout_s):
                first = await receive_hop_message(stream)
        except (trio.TooSlowError, RemoteProtocolError) as exc:
            await self._refuse(stream, "malformed", f"no valid relay request: {exc}")
            return
        if not self.enabled:
            await self._refuse(stream, "service-disabled", "this node does not offer a relay service")
            return
        if isinstance(first, Reserve):
            await self._hold_reservation(stream, peer)
        elif isinstance(first, Connect):
            await self._serve_connect(stream, peer, peer_id_from_wire(first.target))
        else:
            await self._refuse(
                stream, "unexpected-message", f"a stream starts with reserve or connect, not {type(first).__name__}"
            )

    # -- reservations ---------------------------------------------------------------------

    async def _hold_reservation(self, stream: QuicStream, peer: PeerId) -> None:
        observed = self._rpc.observed_address(peer)
        if observed is None:
            # Only a direct connection can hold a reservation: a relayed one would chain relays.
            await self._refuse(stream, "permission-denied", "reserve over a direct connection")
            return
        holder = object()
        renewal = False
        try:
            while True:
                now = trio.current_time()
                granted = self.book.reserve(peer, observed[0], now, holder=holder)
                if isinstance(granted, Refusal):
                    await self._refuse(stream, granted.code, granted.message)
                    return
                if renewal:
                    self.stats.reservations_renewed += 1
                else:
                    self.stats.reservations_granted += 1
                limits = self.book.circuit_limits()
                self._changed.unpark_all()
                await send_relay_message(stream, Reserved(ttl_s=self.config.reservation_ttl_s, limits=limits))
                log.debug("reservation for %s until %.1f", peer, granted.expires_at)
                with trio.move_on_at(granted.expires_at):
                    message = await receive_hop_message(stream)
                    if not isinstance(message, Reserve):
                        await self._refuse(stream, "unexpected-message", "only reserve renews a reservation")
                        return
                    renewal = True
                    continue
                log.debug("reservation of %s expired", peer)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as exc:
            log.debug("reservation stream of %s ended: %r", peer, exc)
        finally:
            self.book.release(peer, holder=holder)
            self._changed.unpark_all()

    # -- circuits -------------------------------------------------------------------------

    async def _serve_connect(self, stream: QuicStream, source: PeerId, target: PeerId) -> None:
        observed = self._rpc.observed_address(source)
        group = None if observed is None else address_group(observed[0], ipv6_prefix_bits=64)
        opened = self.book.open_circuit(source, target, trio.current_time(), source_group=group)
        if isinstance(opened, Refusal):
            await self._refuse(stream, opened.code, opened.message)
            return
        circuit = opened
        try:
            stop = await self._open_stop(circuit)
            if isinstance(stop, Refusal):
                await self._refuse(stream, stop.code, stop.message)
                return
            try:
                await send_relay_message(stream, Connected(circuit.limits))
                self.stats.circuits_opened += 1
                self._changed.unpark_all()
                log.debug("circuit %d %s -> %s open", circuit.circuit_id, source, target)
                await self._splice(circuit, stream, stop)
            finally:
                with trio.CancelScope(shield=True):
                    await stop.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as exc:
            log.debug("circuit %d ended: %r", circuit.circuit_id, exc)
        finally:
            self.book.close_circuit(circuit.circuit_id)
            self._changed.unpark_all()

    async def _open_stop(self, circuit: Circuit) -> QuicStream | Refusal:
        """The target's STOP stream, accepted; or why not."""
        connection = self._rpc.manager.connection(circuit.target)
        if connection is None or connection.relayed_via is not None:
            return Refusal("connection-failed", "the target's reserved connection is gone")
        try:
            with trio.fail_after(self.config.request_timeout_s):
                stop = await self._rpc.open_stream(connection, STOP_PROTOCOL)
                try:
                    await send_relay_message(stop, StopConnect(source=circuit.source.key, limits=circuit.limits))
                    answer = await receive_stop_message(stop)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await stop.aclose()
                    raise
        except (
            trio.TooSlowError,
            RpcError,
            RemoteProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            return Refusal("connection-failed", f"the target did not take the circuit: {exc}")
        if isinstance(answer, StopAccepted):
            return stop
        with trio.CancelScope(shield=True):
            await stop.aclose()
        if isinstance(answer, StopConnect):
            return Refusal("connection-failed", "the target answered with a stop-connect")
        return Refusal("permission-denied", f"the target refused: {answer.code}")

    async def _splice(self, circuit: Circuit, source: QuicStream, target: QuicStream) -> None:
        """Copy both ways until a limit, an end, or the circuit's time; then finish both."""
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = circuit.expires_at
            nursery.start_soon(self._pump, nursery.cancel_scope, circuit, source, target, "to-target")
            nursery.start_soon(self._pump, nursery.cancel_scope, circuit, target, source, "to-source")
        if nursery.cancel_scope.cancelled_caught and trio.current_time() >= circuit.expires_at:
            self.stats.circuits_closed_by_limit += 1
        with trio.CancelScope(shield=True), trio.move_on_after(self.config.request_timeout_s):
            for stream in (source, target):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_eof()

    async def _pump(
        self,
        scope: trio.CancelScope,
        circuit: Circuit,
        reader: QuicStream,
        writer: QuicStream,
        direction: Direction,
    ) -> None:
        try:
            while True:
                room = self.book.forwardable_bytes(circuit.circuit_id, direction, trio.current_time())
                if room <= 0:
                    self.stats.circuits_closed_by_limit += 1
                    log.debug("circuit %d reached its limit (%s)", circuit.circuit_id, direction)
                    return
                data = await reader.receive_some(min(room, _SPLICE_CHUNK_BYTES))
                if not data:
                    return
                await writer.send_all(data)
                self.book.forwarded(circuit.circuit_id, direction, len(data))
                self.stats.bytes_forwarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("circuit %d %s ended: %r", circuit.circuit_id, direction, exc)
        except LocalProtocolError:  # pragma: no cover -- forwardable_bytes bounds every read
            raise
        finally:
            # One direction ending ends the circuit: a half-open circuit would hold a slot.
            scope.cancel()
