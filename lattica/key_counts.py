"""Counts per key that forget a key at zero: what every per-peer and per-address cap keeps.

A cap counts what each peer or address holds now; an entry that stayed at zero would let a
stream of fresh peer ids or spoofed addresses grow the table for good.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def add_one(counts: dict[K, int], key: K) -> int:
    """Count one more for ``key``; returns its new count."""
    count = counts.get(key, 0) + 1
    counts[key] = count
    return count


def remove_one(counts: dict[K, int], key: K) -> None:
    """Count one fewer for ``key``, forgetting it at zero. Raises ``KeyError`` for a key not
    counted (a release without its acquire is a bug of the caller)."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
