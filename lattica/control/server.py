"""The control server: serves a :class:`MethodRegistry` on ``control.sock`` (trio).

Invariants:

* One failing client ends at most its own connection: a client that disconnects before its
  reply (``BrokenResourceError`` on send), sends garbage, a line that is too long or too deep,
  or stalls, never reaches the daemon's nursery.
* Only the node's owner can connect: the socket is created under umask 0177 and chmod 0600.
* Bounded: :data:`~lattica.control.limits.MAX_CONNECTIONS` served at once, one line of at most
  :data:`~lattica.control.limits.MAX_LINE_BYTES`, :data:`~lattica.control.limits.REQUEST_TIMEOUT_S`
  to send it and as long to take each reply (a client that sends requests but never reads the
  replies is dropped instead of holding its slot forever).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

import trio

from lattica.control import codec
from lattica.control.errors import (
    BUSY,
    FAILED,
    INTERNAL,
    TIMEOUT,
    UNKNOWN_METHOD,
    ControlDecodeError,
    ControlError,
)
from lattica.control.limits import MAX_CONNECTIONS, REQUEST_TIMEOUT_S
from lattica.control.registry import MethodRegistry
from lattica.errors import LatticaError

log = logging.getLogger("lattica.control")

_RECEIVE_BYTES = 65536


class ControlServer:
    """Serves ``registry``'s methods on the Unix socket ``path`` until cancelled."""

    def __init__(self, path: Path, registry: MethodRegistry, *, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.path = path
        self.registry = registry
        self.request_timeout_s = request_timeout_s
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; removes the socket file on exit.

        Raises :class:`ControlError` (``busy``) when another daemon answers on ``path``.
        """
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _remove_stale_socket(self.path)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(MAX_CONNECTIONS)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                task_status.started()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Everything a client can cause ends here: an exception escaping a handler task would
        # cancel serve_listeners and with it the daemon.
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            # Refused at once: a client waiting for a slot would hold a socket and a task with
            # no deadline (accepted connections are not left in the listen backlog).
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                async with stream:
                    with trio.fail_after(1.0):
                        busy = ControlError(BUSY, f"{MAX_CONNECTIONS} control clients are connected; try again")
                        await stream.send_all(codec.encode_error(busy))
            return
        try:
            async with stream:
                await self._serve_connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("control client went away before its reply")
        except _ClientNotReading:
            log.debug("control client did not take its reply within %g s; dropped", self.request_timeout_s)
        except Exception:
            log.exception("control connection failed")
        finally:
            self._slots.release()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        lines = codec.LineBuffer()
        while True:
            try:
                line = await self._receive_line(stream, lines)
            except ControlDecodeError as exc:  # too long: the stream cannot be resynchronised
                await self._send(stream, codec.encode_error(exc))
                return
            if line is None:
                return
            await self._send(stream, await self.dispatch(line))

    async def _send(self, stream: trio.SocketStream, reply: bytes) -> None:
        with trio.move_on_after(self.request_timeout_s):
            await stream.send_all(reply)
            return
        raise _ClientNotReading

    async def _receive_line(self, stream: trio.SocketStream, lines: codec.LineBuffer) -> bytes | None:
        with trio.move_on_after(self.request_timeout_s):
            while True:
                line = lines.next_line()
                if line is not None:
                    return line
                data = await stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    return None
                lines.feed(data)
        raise ControlDecodeError(TIMEOUT, f"no complete request line within {self.request_timeout_s:g} s")

    async def dispatch(self, line: bytes) -> bytes:
        """The reply line for one request line (never raises, except trio.Cancelled)."""
        try:
            request = codec.decode_request(line)
            method = self.registry.get(request.method)
            if method is None:
                raise ControlError(UNKNOWN_METHOD, f"unknown method {request.method!r}",
                                   hint="is the daemon older than this CLI? restart it")
            params = codec.decode_params(request, method.params_type)
            return codec.encode_result(await method.handler(params))
        except ControlError as exc:
            return codec.encode_error(exc)
        except (LatticaError, ValueError, OSError) as exc:
            return codec.encode_error(ControlError(FAILED, str(exc) or type(exc).__name__))
        except Exception as exc:
            log.exception("control request crashed: %.200r", line)
            return codec.encode_error(
                ControlError(INTERNAL, f"{type(exc).__name__}: {exc}", hint="the daemon's log has the traceback")
            )


class _ClientNotReading(Exception):
    """The client did not take a reply within the request timeout."""


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse if a daemon still answers there."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ControlError("busy", f"another daemon is already serving {path}")
