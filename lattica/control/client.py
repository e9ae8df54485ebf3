"""The blocking control client the CLI uses: a plain ``AF_UNIX`` socket, no trio.

Importing this module loads msgspec and the standard library only, so a client command starts in
well under 150 ms (``bench/cli.py``).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from lattica.control import codec
from lattica.control.errors import (
    BAD_REPLY,
    TIMEOUT,
    TOO_LARGE,
    ControlDecodeError,
    ControlError,
    DaemonNotRunningError,
)
from lattica.control.limits import DEFAULT_CALL_TIMEOUT_S, MAX_REPLY_BYTES

_START_HINT = "start one with `lattica daemon` (same --home), or pass the --home of the running one"


def call(path: Path, method: str, params: object = None, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> Any:
    """Call ``method`` with ``params`` on the daemon behind ``path``; returns the decoded result.

    Raises :class:`DaemonNotRunningError` when nobody answers, :class:`ControlError` when the
    daemon reports a failure (its code, message and hint) or does not answer within ``timeout_s``.
    """
    request = codec.encode_request(method, params)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except OSError as exc:
            if isinstance(exc, FileNotFoundError | ConnectionRefusedError) or exc.errno in (
                errno.ECONNREFUSED,
                errno.ENOENT,
            ):
                raise DaemonNotRunningError(f"no daemon is running (nothing answers on {path})", _START_HINT) from None
            raise
        try:
            sock.sendall(request)
            return codec.decode_reply(_receive_line(sock))
        except TimeoutError:
            raise ControlError(TIMEOUT, f"the daemon did not answer within {timeout_s:g} s") from None


def _receive_line(sock: socket.socket) -> bytes:
    lines = codec.LineBuffer(MAX_REPLY_BYTES)
    while True:
        try:
            line = lines.next_line()
        except ControlDecodeError:
            raise ControlDecodeError(TOO_LARGE, "the daemon's reply is too large") from None
        if line is not None:
            return line
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ControlDecodeError(BAD_REPLY, "the daemon closed the control connection without a reply")
        lines.feed(chunk)
