"""``RelayConfig``: the relay service's caps and limits and the relay client's settings (the
``[nat.relay]`` table of ``config.toml``).

The defaults follow libp2p circuit relay v2's resource manager where it has one (reservation
TTL one hour, 128 reservations, per-IP reservation cap), except the per-circuit limits: libp2p's
2 min / 128 KiB circuits exist to coordinate a hole punch, while a Lattica circuit carries a whole
QUIC connection for peers that cannot punch (two symmetric NATs), so they are larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.net.address import InvalidAddressError, PeerAddr
from lattica.setting_types import ByteSize, Count, Seconds


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Relay service caps (when ``service`` is on) and relay client settings. Times are seconds,
    sizes bytes.

    Raises :class:`~lattica.net.address.InvalidAddressError` for a ``relays`` entry that is not
    ``PEERID@HOST:PORT``.
    """

    service: bool = False
    """Offer relay reservations and circuits to other nodes (also `lattica daemon --relay-service`)."""
    reservation_ttl_s: Seconds = 3600.0
    """How long a reservation lasts unless renewed (clients renew at half its lifetime)."""
    max_reservations: Count = 128
    """Reservations this relay holds at once, for all peers together."""
    max_reservations_per_ip: Count = 8
    """Reservations from one IP address at once (peer ids cost nothing to mint; addresses do)."""
    max_circuits: Count = 64
    """Circuits this relay forwards at once, for all peers together."""
    max_circuits_per_peer: Count = 8
    """Circuits one peer may have open at once through this relay, as source or as target."""
    max_circuits_per_ip: Count = 16
    """Circuits from one source address (an IPv4 address or IPv6 /64) at once, to all targets."""
    max_circuits_per_ip_to_target: Count = 2
    """Circuits from one source address (an IPv4 address or IPv6 /64) to one target at once:
    peer ids cost nothing to mint, so one host could otherwise take all of a target's
    ``max_circuits_per_peer`` and keep everyone else from reaching it through this relay."""
    circuit_duration_s: Seconds = 600.0
    """A circuit is closed this long after it opened."""
    circuit_bytes: ByteSize = 64 << 20
    """A circuit is closed once it forwarded this many bytes in either direction."""
    max_circuits_per_relay: Count = 16
    """Circuits this node accepts at once through any one relay it holds a reservation on (of
    its ``max_circuits``): a hostile relay could otherwise fill them all with peer ids it
    minted, and no one could reach this node through its other relays."""
    relays: tuple[str, ...] = ()
    """Relays this node keeps reservations on when it is not reachable directly, PEERID@HOST:PORT."""
    reservations: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    """How many of `relays` to hold a reservation on at once (another replaces one that vanishes)."""
    retry_s: Seconds = 30.0
    """Wait before asking a relay again after it refused or failed."""
    request_timeout_s: Seconds = 10.0
    """Deadline of one relay protocol exchange (reserve, connect, stop)."""

    def __post_init__(self) -> None:
        for index, entry in enumerate(self.relays):
            if PeerAddr.parse(entry).peer_id is None:
                raise InvalidAddressError(f"relays[{index}]: {entry!r} needs a peer id (PEERID@HOST:PORT)")

    def relay_addresses(self) -> list[PeerAddr]:
        """The parsed ``relays`` (each with its peer id)."""
        return [PeerAddr.parse(entry) for entry in self.relays]
