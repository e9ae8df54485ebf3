"""The NAT service's control method: ``nat.observed`` (this node's address as a peer sees it)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from lattica.control.errors import FAILED, INVALID_PARAMS, TIMEOUT, ControlError
from lattica.control.limits import MAX_DIAL_STRING_CHARS, MAX_PING_TIMEOUT_S
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


def register_nat_methods(registry: MethodRegistry, node: Node) -> None:
    """Register ``nat.observed``."""

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
