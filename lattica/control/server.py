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
* Streams (``state.watch``) are bounded too: at most :data:`~lattica.control.limits.MAX_STREAMS`
  at once, :data:`~lattica.control.limits.STREAM_BUFFER_ITEMS` lines buffered per subscriber
  (one that falls further behind gets ``overflow`` and its stream ends), the request timeout on
  every line sent, and the subscription is closed as soon as the client hangs up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from lattica.control import codec
from lattica.control.errors import (
    BAD_REQUEST,
    BUSY,
    FAILED,
    INTERNAL,
    OVERFLOW,
    TIMEOUT,
    UNKNOWN_METHOD,
    ControlDecodeError,
    ControlError,
)
from lattica.control.limits import MAX_CONNECTIONS, MAX_STREAMS, REQUEST_TIMEOUT_S, STREAM_BUFFER_ITEMS
from lattica.control.registry import Method, MethodRegistry, Stream
from lattica.errors import LatticaError

log = logging.getLogger("lattica.control")

_RECEIVE_BYTES = 65536


class ControlServer:
    """Serves ``registry``'s methods on the Unix socket ``path`` until cancelled."""

    def __init__(
        self,
        path: Path,
        registry: MethodRegistry,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        stream_buffer_items: int = STREAM_BUFFER_ITEMS,
    ) -> None:
        self.path = path
        self.registry = registry
        self.request_timeout_s = request_timeout_s
        self.stream_buffer_items = stream_buffer_items
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._stream_slots = trio.CapacityLimiter(MAX_STREAMS)

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
            try:
                method, params = self._decode_call(line)
            except ControlError as exc:
                await self._send(stream, codec.encode_error(exc))
                continue
            if method.streaming:
                # A stream owns the connection until it ends; a subscriber sends nothing after
                # its request (what it sends later ends the stream: _cancel_on_hangup).
                if lines.pending_bytes():
                    refused = ControlError(BAD_REQUEST, f"{method.name} streams: nothing may follow its request line")
                    await self._send(stream, codec.encode_error(refused))
                else:
                    await self._serve_stream(stream, method, params, line)
                return
            await self._send(stream, await self._call(method, params, line))

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
        """The reply line for one request line of a plain (not streaming) method (never raises,
        except trio.Cancelled)."""
        try:
            method, params = self._decode_call(line)
        except ControlError as exc:
            return codec.encode_error(exc)
        if method.streaming:
            return codec.encode_error(ControlError(FAILED, f"{method.name} streams; it needs a connection"))
        return await self._call(method, params, line)

    def _decode_call(self, line: bytes) -> tuple[Method[object], object]:
        """The method a request line names and its typed params; raises :class:`ControlError`."""
        request = codec.decode_request(line)
        method = self.registry.get(request.method)
        if method is None:
            raise ControlError(
                UNKNOWN_METHOD,
                f"unknown method {request.method!r}",
                hint="is the daemon older than this CLI? restart it",
            )
        return method, codec.decode_params(request, method.params_type)

    async def _call(self, method: Method[object], params: object, line: bytes) -> bytes:
        try:
            return codec.encode_result(await method.handler(params))
        except Exception as exc:
            return _error_reply(exc, line)

    async def _serve_stream(
        self, stream: trio.SocketStream, method: Method[object], params: object, line: bytes
    ) -> None:
        try:
            self._stream_slots.acquire_nowait()
        except trio.WouldBlock:
            busy = ControlError(BUSY, f"{MAX_STREAMS} streams (watchers) are open; try again")
            await self._send(stream, codec.encode_error(busy))
            return
        try:
            try:
                opened = await method.handler(params)
                if not isinstance(opened, Stream):
                    raise TypeError(f"{method.name} returned {type(opened).__name__}, not a Stream")
            except Exception as exc:
                await self._send(stream, _error_reply(exc, line))
                return
            try:
                await self._send(stream, codec.encode_result(opened.started, more=True))
                await self._pump_stream(stream, opened.items, line)
            except TypeError as exc:  # a first result JSON cannot carry: a bug in the method
                await self._send(stream, _error_reply(exc, line))
            finally:
                await _close_items(opened.items)
        finally:
            self._stream_slots.release()

    async def _pump_stream(self, stream: trio.SocketStream, items: AsyncIterator[object], line: bytes) -> None:
        """Copy ``items`` to the client through a bounded buffer, then the stream's last line.

        Three tasks: this one fills the buffer (it never waits for the client, so a slow reader
        cannot stall whoever produces the items), a writer empties it (each line under the
        request timeout), and a watcher ends everything when the client hangs up.
        """
        buffer_in, buffer_out = trio.open_memory_channel[bytes](self.stream_buffer_items)
        last_line: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cancel_on_hangup, stream, nursery.cancel_scope)
            nursery.start_soon(self._write_stream, stream, buffer_out, last_line, nursery.cancel_scope)
            async with buffer_in:
                last_line.append(await self._fill_stream_buffer(items, buffer_in, line))

    async def _fill_stream_buffer(
        self, items: AsyncIterator[object], buffer: trio.MemorySendChannel[bytes], line: bytes
    ) -> bytes:
        """Buffer every item; returns the stream's last line (a normal end, overflow, or error)."""
        try:
            async for item in items:
                try:
                    buffer.send_nowait(codec.encode_result(item, more=True))
                except trio.WouldBlock:
                    log.debug("control stream subscriber fell %d lines behind; ended", self.stream_buffer_items)
                    return codec.encode_error(
                        ControlError(
                            OVERFLOW,
                            f"this watcher fell more than {self.stream_buffer_items} changes behind",
                            hint="read the stream faster, or watch again (changes in between were missed)",
                        )
                    )
        except Exception as exc:
            return _error_reply(exc, line)
        finally:
            # Closed now, not when the writer has drained: a lagging subscriber holds no
            # subscription in the service while its last lines go out.
            await _close_items(items)
        return codec.encode_result(None)

    async def _write_stream(
        self,
        stream: trio.SocketStream,
        buffer: trio.MemoryReceiveChannel[bytes],
        last_line: list[bytes],
        done: trio.CancelScope,
    ) -> None:
        try:
            async with buffer:
                async for reply in buffer:
                    await self._send(stream, reply)
            # The filler closed the buffer after appending the last line.
            await self._send(stream, last_line[0])
        except _ClientNotReading:
            log.debug("control stream subscriber did not read for %g s; dropped", self.request_timeout_s)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("control stream subscriber went away")
        done.cancel()

    @staticmethod
    async def _cancel_on_hangup(stream: trio.SocketStream, done: trio.CancelScope) -> None:
        # A subscriber sends nothing after its request: end of file, a reset, or any byte ends
        # its stream (at once, not at the next item, which may never come).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(1)
        done.cancel()


async def _close_items(items: AsyncIterator[object]) -> None:
    """Close a stream's item source (an async generator, a trio receive channel), so the
    subscription ends with its reader; shielded, and bounded in case the source misbehaves."""
    aclose = getattr(items, "aclose", None)
    if aclose is None:
        return
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        await aclose()


def _error_reply(exc: Exception, line: bytes) -> bytes:
    """The error reply line for an exception raised by a method (or by encoding its result)."""
    if isinstance(exc, ControlError):
        return codec.encode_error(exc)
    if isinstance(exc, LatticaError | ValueError | OSError):
        return codec.encode_error(ControlError(FAILED, str(exc) or type(exc).__name__))
    log.error("control request crashed: %.200r", line, exc_info=exc)
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
