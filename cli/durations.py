"""Human durations on the command line: ``90s``, ``30m``, ``24h``, ``2d``, or plain seconds."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration_s(text: str) -> float:
    """Seconds in ``text``; raises ``ValueError`` with the accepted forms."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 30m, 24h, 2d)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if value <= 0:
        raise ValueError("a duration must be positive")
    return value
