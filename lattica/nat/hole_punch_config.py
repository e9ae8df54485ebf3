"""``HolePunchConfig``: the ``[nat.hole_punch]`` table of ``config.toml`` (DCUtR-style upgrade of
relayed connections, :mod:`lattica.nat.hole_punch_service`).

Defaults follow libp2p DCUtR (3 rounds) with our own round timeout: a round ends 5 s after its
punches start, far above the ~0.5 s a punch takes across the sim_net matrix and real NATs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.nat import hole_punch
from lattica.setting_types import Seconds


@dataclass(frozen=True, kw_only=True)
class HolePunchConfig:
    """Hole punching over relayed connections. Times are seconds."""

    enabled: bool = True
    """Start hole punching on relayed connections this node accepted, and answer peers that do."""
    rounds: Annotated[int, msgspec.Meta(ge=1, le=10)] = hole_punch.DEFAULT_ROUNDS
    """Rounds per attempt (DCUtR: 3)."""
    round_timeout_s: Annotated[float, msgspec.Meta(ge=1.0, le=60.0)] = hole_punch.DEFAULT_ROUND_TIMEOUT_S
    """A round without a direct path ends this long after it started."""
    retry_after_s: Seconds = 300.0
    """A peer whose attempt failed is tried again after this long (at once when our observed
    addresses change)."""
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    """Attempts running at once, as initiator and responder together; more are refused."""
