"""A token bucket, sans-I/O: how often something may happen, on average and at once.

Used where a node answers strangers or peers at a bounded rate (Stateless Resets in
:mod:`lattica.net.stateless_reset`, replicated-space updates per author in
:mod:`lattica.crdt.service`, STUN answers in :mod:`lattica.nat.service`, dial-backs and their
echoes in :mod:`lattica.nat.autonat`); :class:`KeyedRateLimiter` is a bucket per source under
one bucket for all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
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

    def available(self, now: float) -> float:
        """Tokens there would be at ``now`` (nothing spent, nothing updated)."""
        return min(self.burst, self.tokens + max(0.0, now - self.updated_at) * self.rate_per_s)


class KeyedRateLimiter:
    """A token bucket per key (a source address, a peer) under one shared bucket for all keys:
    :meth:`allow` spends a token from both or from neither. At most ``max_keys`` keys are
    remembered, the least recently used forgotten first (a forgotten key starts full again),
    so a flood of spoofed sources costs bounded memory. Rates are per second; ``now`` is
    seconds on the caller's monotonic clock.

    Raises ``ValueError`` for a rate that is not positive, a burst below 1 or ``max_keys`` < 1.
    """

    def __init__(
        self,
        *,
        per_key_rate_per_s: float,
        per_key_burst: float,
        total_rate_per_s: float,
        total_burst: float,
        max_keys: int,
    ) -> None:
        if min(per_key_rate_per_s, total_rate_per_s) <= 0 or min(per_key_burst, total_burst) < 1 or max_keys < 1:
            raise ValueError("a rate limiter needs positive rates, bursts of at least 1 and max_keys >= 1")
        self.per_key_rate_per_s = per_key_rate_per_s
        self.per_key_burst = per_key_burst
        self.max_keys = max_keys
        self._total_rate_per_s = total_rate_per_s
        self._total_burst = total_burst
        self._total: TokenBucket | None = None  # full at the first call
        self._by_key: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        """Spend one token of ``key``'s bucket and one of the shared bucket at ``now``; False
        (nothing spent) when either is empty."""
        if self._total is None:
            self._total = TokenBucket.full(self._total_rate_per_s, self._total_burst, now)
        bucket = self._by_key.pop(key, None) or TokenBucket.full(self.per_key_rate_per_s, self.per_key_burst, now)
        self._by_key[key] = bucket
        while len(self._by_key) > self.max_keys:
            self._by_key.popitem(last=False)
        if bucket.available(now) < 1.0 or self._total.available(now) < 1.0:
            return False
        return bucket.take(now) and self._total.take(now)
