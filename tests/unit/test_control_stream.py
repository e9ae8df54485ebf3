"""Streaming control calls (``state.watch``): one reply line per item, bounded per subscriber, and
no subscriber -- slow, silent, gone or hostile -- costs the daemon more than its own stream."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.control import ControlError, MethodRegistry, Stream, Subscription, call, codec, limits, subscribe
from lattica.control.messages import NoParams
from lattica.control.server import ControlServer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


class Source:
    """The items of one subscription, pushed by the test; records when the server closed it."""

    def __init__(self) -> None:
        self.push, self._items = trio.open_memory_channel[object](10_000)
        self.closed = trio.Event()

    def __aiter__(self) -> AsyncIterator[object]:
        return self

    async def __anext__(self) -> object:
        try:
            return await self._items.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.closed.set()
        await self._items.aclose()


class WatchParams(msgspec.Struct, forbid_unknown_fields=True):
    fail: bool = False


class Feeds:
    """A streaming method ``watch`` whose every subscription is a :class:`Source` the test sees."""

    def __init__(self) -> None:
        self.sources: list[Source] = []
        self.opened = trio.Condition()

    async def watch(self, params: WatchParams) -> Stream:
        if params.fail:
            raise ControlError("not-found", "no such space", hint="check the id")
        source = Source()
        self.sources.append(source)
        async with self.opened:
            self.opened.notify_all()
        return Stream(started={"watching": len(self.sources)}, items=source)

    async def wait_for(self, count: int) -> list[Source]:
        async with self.opened:
            while len(self.sources) < count:
                await self.opened.wait()
        return self.sources


async def _serve(nursery: trio.Nursery, path: Path, **server_args: Any) -> Feeds:
    feeds = Feeds()
    registry = MethodRegistry()

    async def echo(params: NoParams) -> str:
        return "echo"

    registry.add("echo", NoParams, echo)
    registry.add_stream("watch", WatchParams, feeds.watch)
    await nursery.start(ControlServer(path, registry, **server_args).serve)
    return feeds


def _next(items: Iterator[Any]) -> Any:
    return next(items)


async def test_items_arrive_in_order_then_the_stream_ends(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        feeds = await _serve(nursery, path)
        sub: Subscription = await trio.to_thread.run_sync(subscribe, path, "watch", {})
        with sub:
            assert sub.started == {"watching": 1}
            items = iter(sub)
            (source,) = await feeds.wait_for(1)
            for n in range(3):
                await source.push.send({"n": n, "text": "x\ny"})
            assert [await trio.to_thread.run_sync(_next, items) for _ in range(3)] == [
                {"n": n, "text": "x\ny"} for n in range(3)
            ]
            await source.push.aclose()  # the producer ends: the client's iteration ends cleanly
            assert await trio.to_thread.run_sync(list, items) == []
        await source.closed.wait()
        nursery.cancel_scope.cancel()


async def test_a_refused_subscription_is_one_error_and_a_plain_call_is_not_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path)
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(subscribe, path, "watch", {"fail": True})
        assert (info.value.code, info.value.hint) == ("not-found", "check the id")
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(subscribe, path, "echo", {})
        assert info.value.code == "bad-reply"
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(subscribe, path, "watch", {"unknown": 1})
        assert info.value.code == "invalid-params"
        nursery.cancel_scope.cancel()


async def test_a_subscriber_that_hangs_up_ends_its_subscription_at_once(tmp_path: Path) -> None:
    # Nothing is ever pushed: the server must notice the hang-up itself, not at the next item.
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        feeds = await _serve(nursery, path)
        sub = await trio.to_thread.run_sync(subscribe, path, "watch", {})
        (source,) = await feeds.wait_for(1)
        sub.close()
        with trio.fail_after(10):
            await source.closed.wait()
        nursery.cancel_scope.cancel()


async def test_a_subscriber_that_sends_anything_after_its_request_is_ended(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        feeds = await _serve(nursery, path)
        # Pipelined with the request: refused before any subscription exists.
        reply = await trio.to_thread.run_sync(_exchange, path, codec.encode_request("watch", {}) + b"{}\n", b"")
        assert [_code(line) for line in reply.splitlines()] == ["bad-request"]
        assert feeds.sources == []
        # Sent once the stream runs: the subscription ends at once (no item needed to notice).
        reply = await trio.to_thread.run_sync(_exchange, path, codec.encode_request("watch", {}), b"junk")
        (source,) = await feeds.wait_for(1)
        with trio.fail_after(10):
            await source.closed.wait()
        assert codec.decode_stream_reply(reply.strip()) == ({"watching": 1}, True)
        nursery.cancel_scope.cancel()


def _exchange(path: Path, request: bytes, after_first_line: bytes) -> bytes:
    """Send ``request``, read one line, send ``after_first_line`` (if any), read to the end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(request)
        received = b""
        while b"\n" not in received:
            received += s.recv(65536)
        if after_first_line:
            s.sendall(after_first_line)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                received += chunk
    return received


def _code(line: bytes) -> str:
    with pytest.raises(ControlError) as info:
        codec.decode_reply(line)
    return info.value.code


async def test_a_subscriber_that_falls_behind_gets_overflow_after_what_was_buffered(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    buffer_items = 4
    async with trio.open_nursery() as nursery:
        feeds = await _serve(nursery, path, stream_buffer_items=buffer_items)
        sub = await trio.to_thread.run_sync(subscribe, path, "watch", {})
        (source,) = await feeds.wait_for(1)
        big = "x" * 60_000
        count = 100  # 6 MB: far more than the socket holds while the client does not read
        pushed = 0
        with contextlib.suppress(trio.BrokenResourceError):  # the server closed the subscription
            for n in range(count):
                await source.push.send({"n": n, "pad": big})
                pushed += 1
                await trio.lowlevel.checkpoint()  # let the server take it, as a live fanout would
        with trio.fail_after(10):
            await source.closed.wait()  # ended by the overflow, before the client read anything
        assert pushed < count
        received: list[int] = []

        def read_all() -> ControlError:
            with sub, pytest.raises(ControlError) as info:
                for item in sub:
                    received.append(item["n"])
            return info.value

        error = await trio.to_thread.run_sync(read_all)
        assert error.code == "overflow"
        # Every item that reached the client is in order with none skipped, and far fewer than
        # were pushed: the daemon held at most its buffer plus what the socket took.
        assert received == list(range(len(received)))
        assert len(received) < count
        nursery.cancel_scope.cancel()


async def test_a_subscriber_that_never_reads_is_dropped_after_the_reply_timeout(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        feeds = await _serve(nursery, path, request_timeout_s=0.5, stream_buffer_items=10_000)
        client = trio.SocketStream(trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        await client.socket.connect(str(path))
        await client.send_all(codec.encode_request("watch", {}))
        (source,) = await feeds.wait_for(1)
        for n in range(200):  # 12 MB into a buffer that would take it all: only the timeout helps
            await source.push.send({"n": n, "pad": "x" * 60_000})
        with trio.fail_after(10):
            await source.closed.wait()
        await client.aclose()
        assert await trio.to_thread.run_sync(call, path, "echo") == "echo"
        nursery.cancel_scope.cancel()


async def test_streams_beyond_the_cap_are_busy_and_plain_calls_still_answer(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        feeds = await _serve(nursery, path)
        subs = [await trio.to_thread.run_sync(subscribe, path, "watch", {}) for _ in range(limits.MAX_STREAMS)]
        with pytest.raises(ControlError) as info:
            await trio.to_thread.run_sync(subscribe, path, "watch", {})
        assert info.value.code == "busy"
        assert await trio.to_thread.run_sync(call, path, "echo") == "echo"
        subs.pop().close()  # one slot frees once the server saw the hang-up
        with trio.fail_after(10):
            await feeds.sources[-1].closed.wait()
        await trio.testing.wait_all_tasks_blocked()
        extra = await trio.to_thread.run_sync(subscribe, path, "watch", {})
        assert extra.started == {"watching": limits.MAX_STREAMS + 1}
        for sub in [*subs, extra]:
            sub.close()
        nursery.cancel_scope.cancel()


def test_stream_lines_round_trip_with_their_more_flag() -> None:
    assert codec.decode_stream_reply(codec.encode_result([1, "a"], more=True).strip()) == ([1, "a"], True)
    assert codec.decode_stream_reply(codec.encode_result(None).strip()) == (None, False)
    # A plain reply is byte-for-byte what it was before streams existed.
    assert codec.encode_result({"a": 1}) == b'{"ok":true,"result":{"a":1},"error":null}\n'
    with pytest.raises(ControlError) as info:
        codec.decode_stream_reply(codec.encode_error(ControlError("overflow", "behind")).strip())
    assert info.value.code == "overflow"


@settings(derandomize=True, max_examples=300, deadline=None, database=None)
@given(
    st.binary(max_size=200) | st.builds(lambda v, m: codec.encode_result(v, more=m)[:-1], json_values, st.booleans())
)
def test_stream_line_decoder_gives_a_result_or_a_typed_error(line: bytes) -> None:
    try:
        result, more = codec.decode_stream_reply(line)
    except ControlError:
        return
    assert isinstance(more, bool)
    msgspec.json.encode(result)  # a plain JSON value, never a half-built object
