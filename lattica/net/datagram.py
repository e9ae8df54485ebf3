"""The datagram-socket interface shared by real UDP sockets and ``sim_net``.

``Node`` only ever talks to a :class:`DatagramSocket`, so the same node code runs on a kernel
UDP socket (:class:`UdpSocket`) or on an emulated network (``sim_net``'s sockets satisfy this
protocol structurally; ``sim_net`` imports nothing from ``lattica``).

Contract:

* ``receive_batch`` waits until at least one datagram is available, then returns every datagram
  already queued (up to ``max_datagrams``) without waiting again. Draining in batches lets the
  QUIC driver call ``datagrams_to_send`` once per batch (see FIELD-NOTES).
* ``send_to`` never blocks for long; a datagram the network cannot take is dropped, as UDP does.
* After ``close()``, both raise ``trio.ClosedResourceError``. ``close`` is idempotent.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Protocol, runtime_checkable

import trio

Address = tuple[str, int]

MAX_UDP_PAYLOAD = 65527


@runtime_checkable
class DatagramSocket(Protocol):
    """A bound datagram socket: the only network object the node needs."""

    @property
    def local_address(self) -> Address:
        """The (host, port) this socket is bound to."""
        ...

    async def send_to(self, data: bytes, address: Address) -> None:
        """Send one datagram; it may be lost, as any datagram may."""
        ...

    async def receive_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram, then return all queued ones (at most ``max_datagrams``)."""
        ...

    def close(self) -> None:
        """Release the socket; pending and later calls raise ``trio.ClosedResourceError``."""
        ...


# Errors a UDP send can report for one destination that say nothing about the socket itself.
_TRANSIENT_SEND_ERRNOS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EMSGSIZE,
    errno.EAGAIN,
    errno.ENOBUFS,
    errno.EPERM,
}


class UdpSocket:
    """A kernel UDP socket (IPv4 or IPv6) behind the :class:`DatagramSocket` interface."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._local: Address = (str(host), int(port))
        self._closed = False

    @classmethod
    def bind(cls, host: str = "127.0.0.1", port: int = 0, *, buffer_bytes: int = 4 << 20) -> UdpSocket:
        """Bind a UDP socket to ``host:port`` (port 0 picks a free one); raises ``OSError``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def local_address(self) -> Address:
        return self._local

    async def send_to(self, data: bytes, address: Address) -> None:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            try:
                self._sock.sendto(data, address)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError as exc:
                if exc.errno not in _TRANSIENT_SEND_ERRNOS:
                    raise
            # A send is a checkpoint, as trio's own socket methods are.
            await trio.lowlevel.checkpoint_if_cancelled()
            return

    async def receive_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, Address]]:
        batch: list[tuple[bytes, Address]] = []
        while not batch:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            await trio.lowlevel.wait_readable(self._sock)
            # Drain without yielding: one scheduler turn per batch, not per datagram.
            while len(batch) < max_datagrams:
                try:
                    data, addr = self._sock.recvfrom(MAX_UDP_PAYLOAD)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # ICMP errors from an earlier send surface here on Linux; they are not data.
                    if exc.errno in _TRANSIENT_SEND_ERRNOS:
                        continue
                    raise
                batch.append((data, (str(addr[0]), int(addr[1]))))
        return batch

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # Outside a trio run nobody can be waiting on it, and notify_closing would raise.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
