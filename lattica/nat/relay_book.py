"""The relay's bookkeeping (sans-I/O): reservations, circuits, caps and per-circuit limits.

Pure state: every method that depends on time takes ``now`` (seconds, the driver's clock);
nothing here sleeps, reads a clock or touches a stream. The trio driver is
:mod:`lattica.nat.relay_service`.

Rules (after libp2p circuit relay v2's resource manager):

* A peer holds at most one reservation; ``Reserve`` from a peer that holds one renews it
  (``expires_at = now + reservation_ttl_s``). A reservation is live while ``now < expires_at``.
* New reservations are refused beyond ``max_reservations`` (``resource-limit``) or
  ``max_reservations_per_ip`` from one IP (``too-many-per-peer``); renewals never are.
* A circuit needs a live reservation of its target (``no-reservation``), at most
  ``max_circuits`` open (``resource-limit``) and at most ``max_circuits_per_peer`` open for its
  source and for its target (``too-many-per-peer``), and at most
  ``max_circuits_per_ip_to_target`` from one source address group to one target
  (``too-many-per-peer``): peer ids cost nothing, so one host minting eight could otherwise use
  up every circuit to a node behind a NAT, and no other peer could reach it through this relay;
  and at most ``max_circuits_per_ip`` from one source address group in all.
* Reservations per IP count an IPv6 /64 as one address.
* A circuit forwards at most ``circuit_bytes`` per direction and lives until
  ``opened_at + circuit_duration_s``; :meth:`RelayBook.forwardable_bytes` says how much more
  may pass, so the driver never forwards a byte over the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lattica.errors import LocalProtocolError
from lattica.identity import PeerId
from lattica.key_counts import add_one, remove_one
from lattica.nat.relay_config import RelayConfig
from lattica.nat.relay_messages import CircuitLimits, RefusalCode
from lattica.net.address import address_group

Direction = Literal["to-target", "to-source"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the book said no, as the wire names it."""

    code: RefusalCode
    message: str


@dataclass(slots=True)
class Reservation:
    """One peer's reservation on this relay."""

    peer: PeerId
    ip: str
    expires_at: float
    holder: object
    """Whoever made or last renewed it (the driver's stream); only it may release it."""


@dataclass(slots=True)
class Circuit:
    """One open circuit and what it forwarded so far."""

    circuit_id: int
    source: PeerId
    target: PeerId
    opened_at: float
    expires_at: float
    max_bytes: int
    forwarded: dict[Direction, int] = field(default_factory=lambda: {"to-target": 0, "to-source": 0})
    source_group: str | None = None
    """The source's address group (an IPv4 address or IPv6 /64), where known."""

    @property
    def limits(self) -> CircuitLimits:
        """The limits as the wire states them."""
        return CircuitLimits(duration_s=self.expires_at - self.opened_at, max_bytes=self.max_bytes)


class RelayBook:
    """Reservations and circuits of one relay, with the caps of ``config``."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._reservations: dict[PeerId, Reservation] = {}
        self._per_ip: dict[str, int] = {}
        self._circuits: dict[int, Circuit] = {}
        self._circuits_of: dict[PeerId, int] = {}
        self._circuits_from_group: dict[tuple[str, PeerId], int] = {}  # (source group, target)
        self._circuits_from_group_total: dict[str, int] = {}
        self._next_circuit_id = 1

    def circuit_limits(self) -> CircuitLimits:
        """The limits every circuit of this relay gets."""
        return CircuitLimits(duration_s=self.config.circuit_duration_s, max_bytes=self.config.circuit_bytes)

    # -- reservations ---------------------------------------------------------------------

    @property
    def reservation_count(self) -> int:
        """Reservations held (live or expired but not yet collected)."""
        return len(self._reservations)

    def reserve(self, peer: PeerId, ip: str, now: float, *, holder: object) -> Reservation | Refusal:
        """Grant or renew ``peer``'s reservation (renewals keep their IP slot), or refuse.
        ``ip`` is the address the peer's connection comes from; an IPv6 address counts as its
        /64 (one host is routinely given a whole /64: review, one /64 took all 128)."""
        self.expire(now)
        ip = address_group(ip, ipv6_prefix_bits=64)
        existing = self._reservations.get(peer)
        expires_at = now + self.config.reservation_ttl_s
        if existing is not None:
            existing.expires_at = expires_at
            existing.holder = holder
            return existing
        if len(self._reservations) >= self.config.max_reservations:
            return Refusal(
                "resource-limit", f"this relay holds its limit of {self.config.max_reservations} reservations"
            )
        if self._per_ip.get(ip, 0) >= self.config.max_reservations_per_ip:
            return Refusal(
                "too-many-per-peer",
                f"{self.config.max_reservations_per_ip} reservations from your address already",
            )
        reservation = Reservation(peer, ip, expires_at, holder)
        self._reservations[peer] = reservation
        add_one(self._per_ip, ip)
        return reservation

    def release(self, peer: PeerId, *, holder: object) -> None:
        """Drop ``peer``'s reservation if ``holder`` made or last renewed it (its stream ended)."""
        reservation = self._reservations.get(peer)
        if reservation is not None and reservation.holder is holder:
            self._drop(reservation)

    def reservation(self, peer: PeerId, now: float) -> Reservation | None:
        """``peer``'s live reservation, if any."""
        reservation = self._reservations.get(peer)
        if reservation is None or now >= reservation.expires_at:
            return None
        return reservation

    def expire(self, now: float) -> list[PeerId]:
        """Forget reservations that ran out; returns their peers."""
        gone = [r for r in self._reservations.values() if now >= r.expires_at]
        for reservation in gone:
            self._drop(reservation)
        return [r.peer for r in gone]

    def _drop(self, reservation: Reservation) -> None:
        del self._reservations[reservation.peer]
        remove_one(self._per_ip, reservation.ip)

    # -- circuits -------------------------------------------------------------------------

    @property
    def circuit_count(self) -> int:
        """Circuits open now."""
        return len(self._circuits)

    def open_circuit(
        self, source: PeerId, target: PeerId, now: float, *, source_group: str | None = None
    ) -> Circuit | Refusal:
        """Open a circuit from ``source`` (whose address group is ``source_group``, where
        known) to ``target``, or refuse."""
        config = self.config
        if source == target:
            return Refusal("malformed", "a circuit to yourself")
        if self.reservation(target, now) is None:
            return Refusal("no-reservation", f"{target} holds no reservation on this relay")
        if len(self._circuits) >= config.max_circuits:
            return Refusal("resource-limit", f"this relay forwards its limit of {config.max_circuits} circuits")
        for peer, role in ((source, "you have"), (target, "the target has")):
            if self._circuits_of.get(peer, 0) >= config.max_circuits_per_peer:
                return Refusal("too-many-per-peer", f"{role} {config.max_circuits_per_peer} circuits open here")
        pair = None if source_group is None else (source_group, target)
        if pair is not None and self._circuits_from_group.get(pair, 0) >= config.max_circuits_per_ip_to_target:
            return Refusal(
                "too-many-per-peer",
                f"{config.max_circuits_per_ip_to_target} circuits from your address to {target} open here",
            )
        from_group = 0 if source_group is None else self._circuits_from_group_total.get(source_group, 0)
        if from_group >= config.max_circuits_per_ip:
            return Refusal("too-many-per-peer", f"{config.max_circuits_per_ip} circuits from your address open here")
        circuit = Circuit(
            circuit_id=self._next_circuit_id,
            source=source,
            target=target,
            opened_at=now,
            expires_at=now + config.circuit_duration_s,
            max_bytes=config.circuit_bytes,
            source_group=source_group,
        )
        self._next_circuit_id += 1
        self._circuits[circuit.circuit_id] = circuit
        for peer in (source, target):
            add_one(self._circuits_of, peer)
        if pair is not None and source_group is not None:
            add_one(self._circuits_from_group, pair)
            add_one(self._circuits_from_group_total, source_group)
        return circuit

    def forwardable_bytes(self, circuit_id: int, direction: Direction, now: float) -> int:
        """Bytes the circuit may still forward in ``direction`` (0: it must be closed)."""
        circuit = self._circuits[circuit_id]
        if now >= circuit.expires_at:
            return 0
        return circuit.max_bytes - circuit.forwarded[direction]

    def forwarded(self, circuit_id: int, direction: Direction, n_bytes: int) -> None:
        """Count bytes forwarded. Raises :class:`LocalProtocolError` past the limit (the
        driver must ask :meth:`forwardable_bytes` first)."""
        circuit = self._circuits[circuit_id]
        total = circuit.forwarded[direction] + n_bytes
        if total > circuit.max_bytes:
            raise LocalProtocolError(f"circuit {circuit_id} would forward {total} > {circuit.max_bytes} bytes")
        circuit.forwarded[direction] = total

    def close_circuit(self, circuit_id: int) -> Circuit | None:
        """Forget a circuit (idempotent); returns it with its final counts."""
        circuit = self._circuits.pop(circuit_id, None)
        if circuit is None:
            return None
        for peer in (circuit.source, circuit.target):
            remove_one(self._circuits_of, peer)
        if circuit.source_group is not None:
            remove_one(self._circuits_from_group, (circuit.source_group, circuit.target))
            remove_one(self._circuits_from_group_total, circuit.source_group)
        return circuit

