"""The blocking control client the CLI uses: a plain ``AF_UNIX`` socket, no trio.

Importing this module loads msgspec and the standard library only, so a client command starts in
well under 150 ms (``bench/cli.py``).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
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
    with _connect(path, timeout_s) as sock:
        try:
            sock.sendall(request)
            return codec.decode_reply(_receive_line(sock, codec.LineBuffer(MAX_REPLY_BYTES)))
        except TimeoutError:
            raise ControlError(TIMEOUT, f"the daemon did not answer within {timeout_s:g} s") from None


class Subscription:
    """A streaming call in progress (``state.watch``): :attr:`started` is the daemon's first
    reply; iterating yields each later item until the daemon ends the stream.

    Use it as a context manager (the socket is closed on exit, which ends the subscription in the
    daemon too). Iteration blocks without a timeout (a quiet space sends nothing) and raises
    :class:`ControlError` when the stream ends with an error (``overflow``, the daemon stopped).
    """

    def __init__(self, sock: socket.socket, started: Any, lines: codec.LineBuffer) -> None:
        self._sock = sock
        self.started = started
        self._lines = lines
        self._ended = False

    def __iter__(self) -> Iterator[Any]:
        while not self._ended:
            try:
                line = _receive_line(self._sock, self._lines)
            except ControlDecodeError as exc:
                if exc.code != BAD_REPLY:
                    raise
                raise ControlDecodeError(BAD_REPLY, "the daemon ended the stream (did it stop?)") from None
            result, more = codec.decode_stream_reply(line)
            if not more:
                self._ended = True
                return
            yield result

    def close(self) -> None:
        """Close the connection; the daemon ends the subscription."""
        self._sock.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def subscribe(
    path: Path, method: str, params: object = None, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S
) -> Subscription:
    """Start the streaming ``method``; returns once the daemon confirmed the subscription.

    Raises like :func:`call` (``timeout_s`` bounds the wait for that first reply only), and
    :class:`ControlError` if the daemon answered with a plain reply: ``method`` does not stream.
    """
    request = codec.encode_request(method, params)
    sock = _connect(path, timeout_s)
    try:
        sock.sendall(request)
        lines = codec.LineBuffer(MAX_REPLY_BYTES)
        started, more = codec.decode_stream_reply(_receive_line(sock, lines))
    except TimeoutError:
        sock.close()
        raise ControlError(TIMEOUT, f"the daemon did not answer within {timeout_s:g} s") from None
    except BaseException:
        sock.close()
        raise
    if not more:
        sock.close()
        raise ControlDecodeError(BAD_REPLY, f"{method} answered once instead of streaming")
    sock.settimeout(None)
    return Subscription(sock, started, lines)


def _connect(path: Path, timeout_s: float) -> socket.socket:
    """A socket connected to the daemon's control socket; raises :class:`DaemonNotRunningError`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError) or exc.errno in (
            errno.ECONNREFUSED,
            errno.ENOENT,
        ):
            raise DaemonNotRunningError(f"no daemon is running (nothing answers on {path})", _START_HINT) from None
        raise
    return sock


def _receive_line(sock: socket.socket, lines: codec.LineBuffer) -> bytes:
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
