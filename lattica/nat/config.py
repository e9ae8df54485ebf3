"""``NatConfig``: the ``[nat]`` table of ``config.toml`` (observed addresses, reachability and
the relay in ``[nat.relay]``).

A plain frozen dataclass like every section (the config schema walks dataclasses): other NAT
features add their own sub-section to it. Field types carry their bounds
(:mod:`lattica.setting_types`, checked when a file is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec

from lattica.nat.hole_punch_config import HolePunchConfig
from lattica.nat.relay_config import RelayConfig
from lattica.setting_types import Count, Seconds

MAX_STUN_SERVERS = 8


@dataclass(frozen=True, kw_only=True)
class NatConfig:
    """Observed-address agreement and AutoNAT-style reachability. Times are seconds."""

    min_agreeing_observers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3
    """Distinct observers (peers from distinct IPv4 addresses or IPv6 /56 prefixes, or configured
    STUN servers) that must report one address before it is believed as ours."""
    observation_window_s: Seconds = 1800.0
    """An observation older than this no longer counts towards agreement."""
    stun_servers: tuple[str, ...] = ()
    """Extra STUN servers (RFC 8489) asked for our address, as "IP:PORT" (IP literals only; no
    public server is ever contacted unless listed here)."""
    reachability: Literal["auto", "public", "private"] = "auto"
    """``auto``: decided by dial-backs (AutoNAT). ``public``/``private`` force it, e.g. ``public``
    for a cloud VM behind a static 1:1 NAT, which dial-backs would call private."""
    autonat: bool = True
    """Ask connected peers to dial this node back to learn whether it is publicly reachable;
    a private node runs the DHT in client mode."""
    autonat_servers_per_check: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    """Peers asked for a dial-back in one reachability check."""
    autonat_min_agreeing_results: Annotated[int, msgspec.Meta(ge=1, le=16)] = 3
    """Agreeing dial-back results needed to call the node public or private."""
    autonat_recheck_interval_s: Seconds = 900.0
    """Reachability is checked again this often (and whenever our believed addresses change)."""
    autonat_dial_back_timeout_s: Seconds = 3.0
    """How long a server waits for the client's echo of its dial-back nonce."""
    autonat_serve: bool = True
    """Dial other nodes back when they ask (needs a socket factory; the daemon has one)."""
    autonat_dial_backs_per_address_per_minute: Count = 6
    """Dial-backs peers at one address (an IPv4 address or IPv6 /64) may ask of us per minute
    (burst as many): a dial-back goes to that address, and peer ids cost nothing to mint (20
    ids on one host used up ``autonat_dial_backs_per_minute`` when this was per peer)."""
    autonat_dial_backs_per_minute: Count = 120
    """Dial-backs all peers together may ask of us per minute (burst as many)."""
    relay: RelayConfig = field(default_factory=RelayConfig)
    """Relay service and relay client settings (``[nat.relay]``)."""
    hole_punch: HolePunchConfig = field(default_factory=HolePunchConfig)
    """Hole punching over relayed connections (``[nat.hole_punch]``)."""
