"""The local control API the CLI talks to: JSON lines over a Unix socket (mode 0600).

One request per connection line: ``{"method": "peers", "params": {...}}``; one reply line:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code": "...", "message": "..."}}``.
Lines are bounded (:data:`MAX_LINE_BYTES`); a malformed request gets an error reply, never a
crash. Only the node's owner can connect: the socket is created under umask 0177.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from lattica.errors import LatticaError

log = logging.getLogger("lattica.control")

MAX_LINE_BYTES = 1 << 20

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlRequest(msgspec.Struct, forbid_unknown_fields=True):
    """One call from the CLI."""

    method: str
    params: dict[str, Any] = {}


class ControlError(LatticaError):
    """A control call failed; ``code`` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DaemonNotRunningError(LatticaError):
    """No daemon answers on the home's control socket."""


_request_decoder = msgspec.json.Decoder(ControlRequest)


class ControlServer:
    """Serves registered methods on ``control.sock``; the node registers what it offers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._methods: dict[str, Handler] = {}

    def add_method(self, name: str, handler: Handler) -> None:
        """Expose ``handler`` as ``name``; it takes the params dict and returns JSON-able data."""
        self._methods[name] = handler

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; removes the socket file on exit."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _remove_stale_socket(self.path)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                task_status.started()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = bytearray()
            while True:
                newline = buffer.find(b"\n")
                if newline >= 0:
                    line, buffer = bytes(buffer[:newline]), buffer[newline + 1 :]
                    reply = await self._dispatch(line)
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                    continue
                if len(buffer) > MAX_LINE_BYTES:
                    await stream.send_all(
                        json.dumps(_error("too-large", "request line too long")).encode() + b"\n"
                    )
                    return
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buffer += data

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = _request_decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _error("bad-request", f"malformed control request: {exc}")
        handler = self._methods.get(request.method)
        if handler is None:
            return _error("unknown-method", f"unknown method {request.method!r}")
        try:
            result = await handler(request.params)
        except ControlError as exc:
            return _error(exc.code, exc.message)
        except (LatticaError, ValueError, OSError) as exc:
            return _error("failed", str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("control method %s crashed", request.method)
            return _error("internal", f"{type(exc).__name__}: {exc}")
        return {"ok": True, "result": result}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


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


def call(path: Path, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 60.0) -> Any:
    """Call ``method`` on the daemon behind ``path`` (blocking; for the CLI).

    Raises :class:`DaemonNotRunningError` when nobody answers, :class:`ControlError` when the
    daemon reports a failure.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise DaemonNotRunningError(f"no daemon is running (no {path})") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise DaemonNotRunningError(f"no daemon is running (nothing answers on {path})") from None
            raise
        sock.sendall(json.dumps({"method": method, "params": params or {}}).encode() + b"\n")
        buffer = bytearray()
        while b"\n" not in buffer:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ControlError("timeout", f"the daemon did not answer within {timeout_s:g} s") from None
            if not chunk:
                raise ControlError("closed", "the daemon closed the control connection")
            buffer += chunk
            if len(buffer) > 64 * MAX_LINE_BYTES:
                raise ControlError("too-large", "control reply too large")
    finally:
        sock.close()
    reply = json.loads(buffer[: buffer.index(b"\n")])
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError("bad-reply", "malformed reply from the daemon")
    if not reply["ok"]:
        err = reply.get("error") or {}
        raise ControlError(str(err.get("code", "failed")), str(err.get("message", "failed")))
    return reply.get("result")
