"""The daemon's log file handler: rotates, and survives a disk that cannot take more lines.

Python's file handlers report a failed write by printing ``--- Logging error ---`` and a full
traceback of the failure *and* of the record's own exception to stderr, for every record, once
per record. On a full disk that buried the one line that mattered. This handler says once,
in one line, that the log file cannot be written and why, keeps going (stderr still gets every
record through the daemon's other handler), and says once when the file works again.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import sys
from pathlib import Path


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """A ``RotatingFileHandler`` (``max_bytes`` per file, ``backup_count`` rotated files kept)
    whose write failures are reported as one line on stderr per outage, never as tracebacks."""

    def __init__(self, path: Path, *, max_bytes: int, backup_count: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backup_count)
        self.failing = False
        """True while writes to the log file fail."""
        self._failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` to the file; a failure is reported by :meth:`handleError`."""
        self._failed_now = False
        super().emit(record)
        if self.failing and not self._failed_now:
            self.failing = False
            sys.stderr.write(f"lattica: writing the log file {self.baseFilename} works again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        """Report the first failure of an outage in one line; stay quiet for the rest."""
        self._failed_now = True
        if self.failing:
            return
        self.failing = True
        error = sys.exc_info()[1]
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        sys.stderr.write(
            f"lattica: cannot write the log file {self.baseFilename} ({reason}); "
            "log lines go to stderr only until it works again\n"
        )

    def close(self) -> None:
        """Close the file; a final flush that fails (full disk) is not an error at shutdown."""
        # The lines it held were already reported as unwritable.
        with contextlib.suppress(OSError):
            super().close()
