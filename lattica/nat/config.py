"""``NatConfig``: the ``[nat]`` section of the settings tree (NAT traversal).

Today it holds only the relay (``[nat.relay]``, :class:`~lattica.nat.relay_config.RelayConfig`);
observed addresses and reachability add their settings here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lattica.nat.relay_config import RelayConfig


@dataclass(frozen=True, kw_only=True)
class NatConfig:
    """NAT traversal settings."""

    relay: RelayConfig = field(default_factory=RelayConfig)
    """Relay service and relay client settings."""
