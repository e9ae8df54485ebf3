"""The datagram-socket interface shared by real UDP sockets and ``sim_net``.

``Node`` only ever talks to a :class:`DatagramSocket`, so the same node code runs on a kernel
UDP socket (:class:`UdpSocket`) or on an emulated network (``sim_net``'s sockets satisfy this
protocol structurally; ``sim_net`` imports nothing from ``lattica``).

Contract:

* ``receive_batch`` waits until at least one datagram is available, then returns every datagram
  already queued (up to ``max_datagrams``) without waiting again. Draining in batches lets the
  QUIC driver call ``datagrams_to_send`` once per batch (see FIELD-NOTES).
* ``send_to`` never blocks for long; a datagram the network cannot take is dropped, as UDP does.
* ``send_batch`` sends a list of datagrams in order, as ``send_to`` would, with one checkpoint
  for the whole list: the QUIC driver hands over everything one ``datagrams_to_send`` returned.
* After ``close()``, both raise ``trio.ClosedResourceError``. ``close`` is idempotent.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Sequence
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

    async def send_batch(self, datagrams: Sequence[tuple[bytes, Address]]) -> None:
        """Send each ``(data, address)`` in order, like ``send_to``, with one checkpoint in all."""
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

# UDP generic segmentation offload (Linux >= 4.18): one sendmsg carries a run of equal-sized
# datagrams (the last may be shorter) and the kernel splits it. A full QUIC flight is a run of
# max_datagram_size packets, so this cuts the syscalls of a bulk sender by ~40x; on loopback a
# sendto costs more than building the packet. Not in Python's socket module, hence the number.
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in kernels before 6.2 (128 after)
_GSO_MAX_BYTES = 65000  # the whole run must fit one IP datagram
# What a kernel without GSO (or a route that cannot offload checksums) answers.
_GSO_UNSUPPORTED_ERRNOS = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


class UdpSocket:
    """A kernel UDP socket (IPv4 or IPv6) behind the :class:`DatagramSocket` interface."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._local: Address = (str(host), int(port))
        self._closed = False
        self._gso = hasattr(sock, "sendmsg") and sock.family in (socket.AF_INET, socket.AF_INET6)

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

    async def send_batch(self, datagrams: Sequence[tuple[bytes, Address]]) -> None:
        index = 0
        count = len(datagrams)
        while index < count:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            data, address = datagrams[index]
            run = self._gso_run(datagrams, index) if self._gso else 1
            try:
                if run > 1:
                    self._send_segmented(datagrams, index, run)
                else:
                    self._sock.sendto(data, address)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError as exc:
                if run > 1 and exc.errno in _GSO_UNSUPPORTED_ERRNOS:
                    self._gso = False  # send this run (and all later ones) one by one
                    continue
                if exc.errno not in _TRANSIENT_SEND_ERRNOS:
                    raise
            index += run
        await trio.lowlevel.checkpoint_if_cancelled()

    @staticmethod
    def _gso_run(datagrams: Sequence[tuple[bytes, Address]], start: int) -> int:
        """How many datagrams from ``start`` one segmented send can carry: same address, all of
        the first one's size except possibly the last, within the kernel's limits."""
        data, address = datagrams[start]
        size = len(data)
        if size == 0:
            return 1
        limit = min(len(datagrams) - start, _GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size)
        run = 1
        while run < limit:
            next_data, next_address = datagrams[start + run]
            if next_address != address or not 0 < len(next_data) <= size:
                break
            run += 1
            if len(next_data) < size:
                break
        return run

    def _send_segmented(self, datagrams: Sequence[tuple[bytes, Address]], start: int, run: int) -> None:
        size = len(datagrams[start][0])
        payload = b"".join([datagrams[i][0] for i in range(start, start + run)])
        segment = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))]
        self._sock.sendmsg([payload], segment, 0, datagrams[start][1])

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
