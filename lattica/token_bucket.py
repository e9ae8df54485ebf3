"""A token bucket, sans-I/O: how often something may happen, on average and at once.

Used where a node answers strangers or peers at a bounded rate (Stateless Resets in
:mod:`lattica.net.stateless_reset`, replicated-space updates per author in
:mod:`lattica.crdt.service`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    """Tokens refill at ``rate_per_s`` per second up to ``burst``; :meth:`take` spends them.
    ``tokens`` starts full unless given; ``updated_at`` is when it was last refilled (seconds on
    the caller's monotonic clock)."""

    rate_per_s: float
    burst: float
    tokens: float
    updated_at: float

    @classmethod
    def full(cls, rate_per_s: float, burst: float, now: float) -> TokenBucket:
        """A bucket holding ``burst`` tokens at ``now``."""
        return cls(rate_per_s, burst, burst, now)

    def take(self, now: float, count: int = 1) -> bool:
        """Spend ``count`` tokens at ``now``; False (nothing spent) when fewer are left. A clock
        that went back earns nothing."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated_at) * self.rate_per_s)
        self.updated_at = now
        if self.tokens < count:
            return False
        self.tokens -= count
        return True
