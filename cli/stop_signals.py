"""SIGTERM and SIGHUP handled the way Ctrl-C is, for commands that must undo daemon-side work.

``lattica fetch`` follows a fetch that runs inside the daemon; Ctrl-C cancels it there. Python
ends the process on SIGTERM (``kill``, a service manager, a CI timeout) or SIGHUP (the terminal
closed) without running any handler, which left the daemon's fetch running (review finding).
Inside :func:`stop_signals_interrupt` those signals raise :class:`StopSignal`, a
``KeyboardInterrupt``, so the command's Ctrl-C path runs for them too; the command then exits
with :attr:`StopSignal.exit_code` (128 + the signal number, as a shell reports a process
killed by it: Ctrl-C's is 130).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""The signals :func:`stop_signals_interrupt` turns into :class:`StopSignal`."""


class StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived inside :func:`stop_signals_interrupt` (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The exit code a process stopped by this signal reports: 128 + the signal number."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGHUP raises :class:`StopSignal` in the main
    thread; later ones are ignored until the block ends, so the undo the first one started
    (a cancel call to the daemon) is not cut short. The previous handlers are restored on
    exit. Off the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise StopSignal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
