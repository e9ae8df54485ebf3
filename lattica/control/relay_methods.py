"""The relay's control methods: ``relay.status`` (service counters, reservations held,
relayed addresses) and ``relay.reserve`` (hold a reservation on a relay now)."""

from __future__ import annotations

from typing import Annotated

import msgspec
import trio

from lattica.control.errors import FAILED, INVALID_PARAMS, TIMEOUT, ControlError
from lattica.control.limits import MAX_DIAL_STRING_CHARS, MAX_PING_TIMEOUT_S
from lattica.control.messages import NoParams
from lattica.control.registry import MethodRegistry
from lattica.nat.relay_address import RelayedAddr
from lattica.net.address import InvalidAddressError, PeerAddr
from lattica.node import Node

_HINT = "give the relay as PEERID@HOST:PORT; it must run `lattica daemon --relay-service`"


class ReservationRow(msgspec.Struct):
    """One reservation this node holds."""

    relay: str
    expires_in_s: float
    renewals: int
    circuit_max_bytes: int
    circuit_duration_s: float


class RelayServiceRow(msgspec.Struct):
    """What this node's relay service is doing (all zero when it is off)."""

    enabled: bool
    reservations: int
    circuits: int
    reservations_granted: int
    circuits_opened: int
    bytes_forwarded: int
    refusals: dict[str, int]


class RelayStatusResult(msgspec.Struct):
    """``relay.status``."""

    service: RelayServiceRow
    reservations: list[ReservationRow]
    relayed_addrs: list[str]
    circuits: int
    """Circuits this node is an end of."""


class ReserveParams(msgspec.Struct, forbid_unknown_fields=True):
    """``relay.reserve``: the relay (with its peer id) and how long to wait for the reservation."""

    addr: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DIAL_STRING_CHARS)]
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_PING_TIMEOUT_S)] = 10.0


class ReserveResult(msgspec.Struct):
    """``relay.reserve``: the relayed address peers can now dial."""

    relayed_addr: str
    expires_in_s: float


def register_relay_methods(registry: MethodRegistry, node: Node) -> None:
    """Register ``relay.status`` and ``relay.reserve``."""
    client = node.relay_client
    service = node.relay_service

    def rows() -> list[ReservationRow]:
        now = trio.current_time()
        return [
            ReservationRow(
                relay=str(r.relay),
                expires_in_s=round(r.expires_at - now, 3),
                renewals=r.renewals,
                circuit_max_bytes=r.limits.max_bytes,
                circuit_duration_s=r.limits.duration_s,
            )
            for r in client.reservations()
        ]

    async def status(_: NoParams) -> RelayStatusResult:
        stats = service.stats
        return RelayStatusResult(
            service=RelayServiceRow(
                enabled=service.enabled,
                reservations=service.book.reservation_count,
                circuits=service.book.circuit_count,
                reservations_granted=stats.reservations_granted,
                circuits_opened=stats.circuits_opened,
                bytes_forwarded=stats.bytes_forwarded,
                refusals=dict(stats.refusals),
            ),
            reservations=rows(),
            relayed_addrs=client.relayed_addresses(),
            circuits=client.circuit_count(),
        )

    async def reserve(params: ReserveParams) -> ReserveResult:
        try:
            relay = PeerAddr.parse(params.addr)
        except InvalidAddressError as exc:
            raise ControlError(INVALID_PARAMS, f"addr: {exc}", hint=_HINT) from None
        if relay.peer_id is None:
            raise ControlError(INVALID_PARAMS, "addr: the relay's peer id is needed", hint=_HINT)
        if relay.peer_id == node.peer_id:
            raise ControlError(FAILED, "this node cannot reserve on itself", hint=_HINT)
        with trio.move_on_after(params.timeout_s):
            held = await client.reserve(relay)
            return ReserveResult(
                relayed_addr=str(RelayedAddr(held.relay, node.peer_id)),
                expires_in_s=round(held.expires_at - trio.current_time(), 3),
            )
        raise ControlError(
            TIMEOUT,
            f"no reservation on {params.addr} within {params.timeout_s:g} s (the relay refused or did not answer;"
            " see the daemon's log)",
            hint=_HINT,
        )

    registry.add("relay.status", NoParams, status)
    registry.add("relay.reserve", ReserveParams, reserve)
