"""Annotated types for configuration settings: bounded durations, counts and sizes.

The ``msgspec.Meta`` constraints are checked when a configuration is loaded from a file
(:func:`lattica.config.load_config` runs ``msgspec.convert``); code that builds a config
directly is trusted (tests pass ``math.inf`` to switch a timer off). Every setting is bounded:
``nan`` and ``inf`` are refused for durations, and no count or size can be absurdly large.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_DURATION_S = 366 * 24 * 3600.0
"""Longest duration any setting accepts from a file (a year): finite, so ``inf`` is refused."""

Seconds = Annotated[float, msgspec.Meta(gt=0.0, le=MAX_DURATION_S)]
"""A duration in seconds, in (0, one year]. ``nan`` fails ``> 0`` and ``inf`` fails ``<= max``."""

Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
"""A positive count (connections, streams, peers, requests)."""

NonNegativeCount = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
"""A count where 0 has a meaning (no limit, no acknowledgement needed)."""

ByteSize = Annotated[int, msgspec.Meta(ge=1, le=1 << 40)]
"""A size in bytes, at least 1, at most 1 TiB."""
