"""The one error shape of the control API: ``{"code", "message", "hint"}``.

``code`` is for programs (the CLI maps it to an exit code in one place, ``cli/exit_codes.py``),
``message`` says what happened, ``hint`` (optional) what to do about it.
"""

from __future__ import annotations

from lattica.errors import LatticaError

INVALID_PARAMS = "invalid-params"
"""The caller's arguments are wrong (a usage error: the CLI exits 2)."""
TOO_LARGE = "too-large"
"""The request line or one of its values exceeds a limit in :mod:`lattica.control.limits`."""
BAD_REQUEST = "bad-request"
"""The request line is not a valid control request (malformed JSON, too deep, wrong shape)."""
UNKNOWN_METHOD = "unknown-method"
"""No service registered this method (an older daemon, or a typo in a raw request)."""
NOT_FOUND = "not-found"
"""The thing asked for does not exist (a record, providers)."""
TIMEOUT = "timeout"
"""The operation or the daemon did not answer in time."""
FAILED = "failed"
"""The operation failed for a reason the message explains."""
INTERNAL = "internal"
"""A bug in the daemon; its log has the traceback."""
DAEMON_NOT_RUNNING = "daemon-not-running"
"""Nobody answers on the control socket (client side only)."""
BAD_REPLY = "bad-reply"
"""The daemon's reply could not be decoded (client side only)."""
BUSY = "busy"
"""The daemon is serving its limit of control connections (or streams); try again."""
FORBIDDEN = "forbidden"
"""This node may not do that (not the space's owner, not one of its writers)."""
OVERFLOW = "overflow"
"""A streaming client fell more than :data:`~lattica.control.limits.STREAM_BUFFER_ITEMS` lines
behind; its stream was ended (it would have missed items)."""

USAGE_CODES = frozenset({INVALID_PARAMS, TOO_LARGE})
"""Codes that mean "the caller asked wrongly" rather than "the operation failed"."""


class ControlError(LatticaError):
    """A control call failed; ``code`` is machine-readable, ``message``/``hint`` are for people."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


class DaemonNotRunningError(ControlError):
    """No daemon answers on the home's control socket."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(DAEMON_NOT_RUNNING, message, hint)


class ControlDecodeError(ControlError):
    """A control line is malformed, too long or too deeply nested (a typed error, never a crash)."""
