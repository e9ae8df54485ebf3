"""The control socket: private, bounded, typed errors for bad requests, never a crash."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from lattica.control import ControlError, ControlServer, DaemonNotRunningError, call


async def _serve(nursery: trio.Nursery, path: Path) -> ControlServer:
    server = ControlServer(path)

    async def echo(params: dict[str, Any]) -> Any:
        return params

    async def broken(params: dict[str, Any]) -> Any:
        raise ControlError("nope", "it failed on purpose")

    async def crash(params: dict[str, Any]) -> Any:
        raise KeyError("bug")

    server.add_method("echo", echo)
    server.add_method("broken", broken)
    server.add_method("crash", crash)
    await nursery.start(server.serve)
    return server


def _raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the server may refuse and close before reading everything; its reply is queued
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                # A server that closes with part of our request unread makes Linux reset the
                # connection; what it sent before closing is still read first, so this is the end.
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def test_call_round_trip_and_typed_failures(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        assert path.stat().st_mode & 0o777 == 0o600
        assert await trio.to_thread.run_sync(call, path, "echo", {"x": [1, 2]}) == {"x": [1, 2]}
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(call, path, "broken")
        assert info.value.code == "nope"
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(call, path, "missing")
        assert info.value.code == "unknown-method"
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(call, path, "crash")
        assert info.value.code == "internal"
        # Malformed lines get an error reply and the server keeps serving.
        reply = await trio.to_thread.run_sync(_raw, path, b'{"method": 5}\nnot json\n')
        assert reply.count(b'"bad-request"') == 2
        assert await trio.to_thread.run_sync(call, path, "echo", {}) == {}
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_oversize_request_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        reply = await trio.to_thread.run_sync(_raw, path, b"x" * (2 << 20))
        assert b'"too-large"' in reply
        nursery.cancel_scope.cancel()


def test_call_without_daemon_says_so(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunningError):
        call(tmp_path / "control.sock", "status")
    # A stale socket file left by a killed daemon: still "not running".
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()
    with pytest.raises(DaemonNotRunningError):
        call(tmp_path / "control.sock", "status")


async def test_stale_socket_is_replaced_but_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        with pytest.raises(ControlError):
            await ControlServer(path).serve()
        assert await trio.to_thread.run_sync(call, path, "echo", {"a": "b"}) == {"a": "b"}
        nursery.cancel_scope.cancel()
