"""The control socket: private, bounded, one error shape, and no client can take the daemon down."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from lattica.control import ControlDecodeError, ControlError, DaemonNotRunningError, MethodRegistry, call, codec, limits
from lattica.control.messages import NoParams, Request
from lattica.control.server import ControlServer
from lattica.errors import LocalProtocolError


class EchoParams(msgspec.Struct, forbid_unknown_fields=True):
    x: list[int] | None = None
    text: str | None = None


class Slow:
    """A method that answers only when released, and says when it was called."""

    def __init__(self) -> None:
        self.called = trio.Event()
        self.release = trio.Event()

    async def __call__(self, _: NoParams) -> str:
        self.called.set()
        await self.release.wait()
        return "late"


async def _serve(nursery: trio.Nursery, path: Path, slow: Slow | None = None) -> ControlServer:
    registry = MethodRegistry()

    async def echo(params: EchoParams) -> EchoParams:
        return params

    async def broken(_: NoParams) -> None:
        raise ControlError("nope", "it failed on purpose", hint="do it differently")

    async def crash(_: NoParams) -> None:
        raise KeyError("bug")

    registry.add("echo", EchoParams, echo)
    registry.add("broken", NoParams, broken)
    registry.add("crash", NoParams, crash)
    registry.add("slow", NoParams, slow or Slow())
    server = ControlServer(path, registry)
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


def _error_codes(reply: bytes) -> list[str]:
    codes = []
    for line in reply.splitlines():
        with pytest.raises(ControlError) as info:
            codec.decode_reply(line)
        codes.append(info.value.code)
    return codes


async def test_call_round_trip_and_one_error_shape(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        assert path.stat().st_mode & 0o777 == 0o600
        assert await trio.to_thread.run_sync(call, path, "echo", {"x": [1, 2]}) == {"x": [1, 2], "text": None}
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(call, path, "broken")
        error = info.value
        assert (error.code, error.message, error.hint) == ("nope", "it failed on purpose", "do it differently")
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(call, path, "missing")
        assert info.value.code == "unknown-method"
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(call, path, "crash")
        assert info.value.code == "internal"
        # Params are typed: a wrong type or an unknown field is the caller's mistake.
        for params in ({"x": "not a list"}, {"y": 1}):
            with pytest.raises(ControlError) as info:
                await trio.to_thread.run_sync(call, path, "echo", params)
            assert info.value.code == "invalid-params"
        # Malformed lines get an error reply and the server keeps serving.
        reply = await trio.to_thread.run_sync(_raw, path, b'{"method": 5}\nnot json\n')
        assert _error_codes(reply) == ["bad-request", "bad-request"]
        assert await trio.to_thread.run_sync(call, path, "echo", {}) == {"x": None, "text": None}
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_oversize_request_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        reply = await trio.to_thread.run_sync(_raw, path, b"x" * (limits.MAX_LINE_BYTES + 2))
        assert _error_codes(reply) == ["too-large"]
        nursery.cancel_scope.cancel()


async def test_client_gone_before_its_reply_does_not_stop_the_server(tmp_path: Path) -> None:
    # Issue 8 A2: `timeout -s INT 1 lattica ping ...` left the daemon's send_all to a closed
    # socket; BrokenResourceError escaped the handler and ended the daemon.
    path = tmp_path / "control.sock"
    slow = Slow()
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path, slow)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(str(path))
        await client.send(b'{"method": "slow"}\n')
        await slow.called.wait()
        client.close()
        slow.release.set()
        await trio.testing.wait_all_tasks_blocked()  # the reply was sent into the closed socket
        assert await trio.to_thread.run_sync(call, path, "echo", {"text": "still here"}) == {
            "x": None,
            "text": "still here",
        }
        nursery.cancel_scope.cancel()


async def test_a_client_that_never_reads_its_replies_is_dropped_not_kept_forever(tmp_path: Path) -> None:
    # FINDINGS.md F2: 64 local clients that pipelined requests and never read the replies held
    # every control slot forever (send_all had no deadline); `lattica status` then hung.
    path = tmp_path / "control.sock"
    registry = MethodRegistry()

    async def echo(params: EchoParams) -> EchoParams:
        return params

    registry.add("echo", EchoParams, echo)
    server = ControlServer(path, registry, request_timeout_s=0.5)
    request = codec.encode_request("echo", {"text": "x" * 60_000})
    count = 200  # up to ~12 MB of replies: far more than the socket buffers hold
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        client = trio.SocketStream(trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        await client.socket.connect(str(path))
        sent = 0
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
            for _ in range(count):
                await client.send_all(request)
                sent += 1
        await trio.sleep(2)  # the server is stuck sending; past its deadline it drops us
        received = b""
        with trio.move_on_after(10), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await client.receive_some(1 << 20):
                received += chunk
        client.socket.close()
        assert sent > 0
        assert received.count(b"\n") < sent
        assert await trio.to_thread.run_sync(call, path, "echo", {"text": "still here"}) == {
            "x": None,
            "text": "still here",
        }
        nursery.cancel_scope.cancel()


async def test_deeply_nested_json_is_a_typed_error_not_a_crash(tmp_path: Path) -> None:
    # Issue 8 A3: 4 KB nested 2,000 levels deep made msgspec raise RecursionError in the daemon.
    path = tmp_path / "control.sock"
    deep = b"[" * 2000 + b"]" * 2000
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        reply = await trio.to_thread.run_sync(
            _raw, path, deep + b"\n" + b'{"method": "echo", "params": {"x": ' + deep + b"}}\n"
        )
        assert _error_codes(reply) == ["bad-request", "bad-request"]
        assert await trio.to_thread.run_sync(call, path, "echo", {"x": [7]}) == {"x": [7], "text": None}
        nursery.cancel_scope.cancel()


def test_depth_limit_ignores_brackets_inside_strings() -> None:
    codec.check_depth(b'{"method": "echo", "params": {"text": "' + b"[" * 5000 + b'"}}')
    codec.check_depth(b"[" * limits.MAX_JSON_DEPTH + b"]" * limits.MAX_JSON_DEPTH)
    with pytest.raises(ControlDecodeError):
        codec.check_depth(b"[" * (limits.MAX_JSON_DEPTH + 1) + b"]" * (limits.MAX_JSON_DEPTH + 1))
    with pytest.raises(ControlDecodeError):  # an escaped quote does not end the string
        codec.check_depth(b'["\\"' + b"[" * 100 + b"]")


@given(st.binary(max_size=2048))
def test_request_decoder_gives_a_request_or_a_typed_error(data: bytes) -> None:
    try:
        request = codec.decode_request(data)
    except ControlDecodeError:
        return
    assert isinstance(request.method, str)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
)


@given(_JSON_VALUES)
def test_reply_decoder_gives_the_result_or_a_typed_error(value: object) -> None:
    line = msgspec.json.encode({"ok": True, "result": value})
    with contextlib.suppress(ControlDecodeError):  # nested deeper than the limit
        assert codec.decode_reply(line) == value


@given(st.binary(max_size=2048))
def test_reply_decoder_on_garbage_gives_a_typed_error(data: bytes) -> None:
    with contextlib.suppress(ControlError):
        codec.decode_reply(data)


@given(st.binary(max_size=512) | _JSON_VALUES.map(msgspec.json.encode))
def test_params_decoder_gives_typed_params_or_a_typed_error(data: bytes) -> None:
    request = Request(method="echo", params=msgspec.Raw(data))
    try:
        params = codec.decode_params(request, EchoParams)
    except ControlError as exc:
        assert exc.code == "invalid-params"
        return
    assert isinstance(params, EchoParams)


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_line_buffer_returns_what_was_fed_split_at_newlines(chunks: list[bytes]) -> None:
    lines = codec.LineBuffer(max_line_bytes=10_000)
    got = []
    for chunk in chunks:
        lines.feed(chunk)
        while (line := lines.next_line()) is not None:
            got.append(line)
    assert got == b"".join(chunks).split(b"\n")[:-1]


def test_registering_a_name_twice_is_refused() -> None:
    registry = MethodRegistry()

    async def noop(_: NoParams) -> None:
        return None

    registry.add("dht.get", NoParams, noop)
    with pytest.raises(LocalProtocolError):
        registry.add("dht.get", NoParams, noop)


def test_limits_agree_with_the_dht() -> None:
    # The CLI must not import the DHT (start-up cost), so its copy of the limits is checked here.
    from lattica.dht import records
    from lattica.dht.service import DhtConfig

    assert limits.MAX_VALUE_BYTES == records.MAX_VALUE_BYTES
    assert limits.MAX_KEY_BYTES == records.MAX_USER_KEY_BYTES
    assert limits.MAX_CID_BYTES == records.MAX_CID_BYTES
    assert DhtConfig().max_record_ttl_s == limits.MAX_RECORD_TTL_S


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
            await ControlServer(path, MethodRegistry()).serve()
        assert await trio.to_thread.run_sync(call, path, "echo", {"text": "b"}) == {"x": None, "text": "b"}
        nursery.cancel_scope.cancel()


async def test_clients_beyond_the_connection_cap_are_answered_busy_at_once(tmp_path: Path) -> None:
    # FINDINGS.md F3: connections beyond the cap were accepted and waited for a slot with no
    # deadline; 3,000 idle connects made `lattica status` hang for over a minute.
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        idle = []
        for _ in range(limits.MAX_CONNECTIONS):
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(str(path))
            idle.append(client)
        await trio.testing.wait_all_tasks_blocked()
        reply = await trio.to_thread.run_sync(_raw, path, b'{"method": "echo"}\n')
        assert _error_codes(reply) == ["busy"]
        for client in idle:
            client.close()
        await trio.testing.wait_all_tasks_blocked()
        assert await trio.to_thread.run_sync(call, path, "echo", {}) == {"x": None, "text": None}
        nursery.cancel_scope.cancel()


def test_a_lone_surrogate_escape_is_named_not_called_truncated() -> None:
    # msgspec reports an unpaired \ud800 as "Input data was truncated" (review finding).
    with pytest.raises(ControlDecodeError, match="unpaired UTF-16 surrogate"):
        codec.decode_request(b'{"method":"status","params":{"x":"\\ud800"}}')
    assert codec.decode_request(b'{"method":"status","params":{"x":"\\ud83d\\ude00"}}').method == "status"
    with pytest.raises(ControlDecodeError, match="truncated"):
        codec.decode_request(b'{"method":"status","par')
