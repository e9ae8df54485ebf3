"""The NAT service's control methods: ``nat.observed`` (this node's address as a peer sees it)
and ``nat.status`` (reachability, believed observed addresses, mapping behaviour)."""

from __future__ import annotations

from typing import Annotated

import msgspec
import trio

from lattica.control.errors import FAILED, INVALID_PARAMS, TIMEOUT, ControlError
from lattica.control.limits import MAX_DIAL_STRING_CHARS, MAX_PING_TIMEOUT_S
from lattica.control.messages import NoParams
from lattica.control.registry import MethodRegistry
from lattica.nat import ObservedAddressError, ObservedAddressTimeoutError
from lattica.net.address import InvalidAddressError, PeerAddr, format_host_port, network_address
from lattica.node import Node

_HINT = "give a peer's IP:PORT; check that its daemon runs and is reachable over UDP"


class ObservedParams(msgspec.Struct, forbid_unknown_fields=True):
    """``nat.observed``: whom to ask (``HOST:PORT`` or ``PEERID@HOST:PORT``; an IP literal, and
    the peer id, if given, is not checked: STUN is unauthenticated)."""

    addr: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DIAL_STRING_CHARS)]
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_PING_TIMEOUT_S)] = 10.0


class ObservedResult(msgspec.Struct):
    """``nat.observed``: ``observed_addr`` is where ``asked`` saw our request come from."""

    observed_addr: str
    asked: str
    local_addr: str


class ObservedAddressRow(msgspec.Struct):
    """``nat.status``: one address of ours that enough observers agree on."""

    addr: str
    observers: int
    """Distinct observer groups (IPv4 addresses, IPv6 /56s, STUN servers) reporting it."""


class HolePunchRow(msgspec.Struct):
    """``nat.status``: hole punching over relayed connections (counters since start)."""

    enabled: bool
    active: int
    """Attempts running now."""
    attempts: int
    succeeded: int
    failed: int
    refused: int
    """Exchanges peers started that this node refused (busy, not relayed, switched off)."""
    punches_sent: int


class NatStatusResult(msgspec.Struct):
    """``nat.status``: what this node knows about its NAT."""

    reachability: str
    """``public``, ``private`` or ``unknown`` (AutoNAT dial-backs, or forced by config)."""
    confidence: int
    """Agreeing dial-back results behind ``reachability``."""
    reachable_results: int
    unreachable_results: int
    translated: bool
    """The address tested is not one of this node's own: a NAT is in the path."""
    observed_addrs: list[ObservedAddressRow]
    observers: int
    """Observer groups with a live report (believed or not)."""
    mapping: str
    """``endpoint-independent``, ``endpoint-dependent`` (symmetric NAT) or ``unknown``."""
    dht_mode: str
    """``server`` or ``client`` (a private node queries the DHT but is not stored in tables)."""
    relay_reservation_wanted: bool
    relay_reservations: list[str]
    """This node's relayed addresses, one per relay holding a reservation for it
    (``RELAYPEERID@HOST:PORT/relay/OURPEERID``)."""
    checks_done: int
    hole_punch: HolePunchRow | None = None
    """Hole-punching counters since start."""


def register_nat_methods(registry: MethodRegistry, node: Node) -> None:
    """Register ``nat.observed`` and ``nat.status``."""

    async def nat_status(params: NoParams) -> NatStatusResult:
        service = node.reachability
        status = service.status()
        now = trio.current_time()
        return NatStatusResult(
            reachability=status.reachability,
            confidence=status.confidence,
            reachable_results=status.reachable_results,
            unreachable_results=status.unreachable_results,
            translated=status.translated,
            observed_addrs=[
                ObservedAddressRow(format_host_port(b.address), b.observers) for b in service.book.believed(now)
            ],
            observers=service.book.observer_count(now),
            mapping=service.mapping_behaviour(),
            dht_mode="client" if node.dht.client_mode else "server",
            relay_reservation_wanted=service.relay_reservation_wanted,
            relay_reservations=node.relay_client.relayed_addresses(),
            checks_done=service.checks_done,
            hole_punch=HolePunchRow(
                enabled=node.hole_punch.config.enabled,
                active=len(node.hole_punch.active()),
                attempts=node.hole_punch.stats.attempts,
                succeeded=node.hole_punch.stats.succeeded,
                failed=node.hole_punch.stats.failed,
                refused=node.hole_punch.stats.refused,
                punches_sent=node.hole_punch.stats.punches_sent,
            ),
        )

    registry.add("nat.status", NoParams, nat_status)

    async def observed(params: ObservedParams) -> ObservedResult:
        try:
            target = network_address(*PeerAddr.parse(params.addr).address)
        except InvalidAddressError as exc:
            raise ControlError(INVALID_PARAMS, f"addr: {exc}", hint="use IP:PORT, e.g. 198.51.100.7:4001") from None
        try:
            mapped = await node.nat.observed_address(target, timeout_s=params.timeout_s)
        except ObservedAddressTimeoutError:
            raise ControlError(
                TIMEOUT, f"no STUN answer from {params.addr} within {params.timeout_s:g} s", hint=_HINT
            ) from None
        except ObservedAddressError as exc:
            raise ControlError(FAILED, f"could not ask {params.addr}: {exc}", hint=_HINT) from None
        return ObservedResult(
            observed_addr=format_host_port(mapped),
            asked=format_host_port(target),
            local_addr=format_host_port(node.socket.local_address),
        )

    registry.add("nat.observed", ObservedParams, observed)
