"""Log a repeated condition once instead of once per occurrence (a flood is a DoS on the log)."""

from __future__ import annotations

import logging
from typing import Any


class LogOnce:
    """Remembers which keys were logged; each key is logged the first time only."""

    def __init__(self, logger: logging.Logger, *, max_keys: int = 4096) -> None:
        self._logger = logger
        self._seen: set[object] = set()
        self._max_keys = max_keys

    def warning(self, key: object, message: str, *args: Any) -> None:
        """Log ``message`` at WARNING unless ``key`` was logged before."""
        if key in self._seen:
            return
        if len(self._seen) >= self._max_keys:
            # Bounded memory: forgetting old keys only costs a repeated line.
            self._seen.clear()
        self._seen.add(key)
        self._logger.warning(message, *args)
