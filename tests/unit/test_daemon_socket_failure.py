"""A daemon whose UDP socket fails for good stops with one clear error (issue 7, section 7)."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from lattica import daemon
from lattica.daemon import DaemonError, run_daemon
from lattica.net.datagram import UdpSocket


class _DyingSocket:
    """A real UDP socket whose receive fails with EBADF once the daemon is up."""

    def __init__(self, inner: UdpSocket, die: trio.Event) -> None:
        self._inner = inner
        self._die = die

    @property
    def local_address(self) -> tuple[str, int]:
        return self._inner.local_address

    async def send_to(self, data: bytes, address: tuple[str, int]) -> None:
        await self._inner.send_to(data, address)

    async def send_batch(self, datagrams: Sequence[tuple[bytes, tuple[str, int]]]) -> None:
        await self._inner.send_batch(datagrams)

    async def receive_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
        await self._die.wait()
        raise OSError(errno.EBADF, "Bad file descriptor")

    def close(self) -> None:
        self._inner.close()


async def test_a_failed_socket_stops_the_daemon_with_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    die = trio.Event()
    real_bind = UdpSocket.bind

    def bind(host: str, port: int) -> _DyingSocket:
        return _DyingSocket(real_bind(host, port), die)

    monkeypatch.setattr(daemon.UdpSocket, "bind", staticmethod(bind))
    home = tmp_path / "home"
    with trio.fail_after(30):  # a hang guard, not the assertion
        with pytest.raises(DaemonError, match="socket") as info:
            await run_daemon(home, listen="127.0.0.1:0", on_ready=lambda _node: die.set())
    assert "\n" not in str(info.value)
    assert not (home / "control.sock").exists()
