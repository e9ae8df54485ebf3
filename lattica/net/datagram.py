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
* Addresses are ``(host, port)`` with ``host`` an IP literal. A destination the socket cannot
  send to (a name, a zone id, the other address family) is dropped like a lost datagram and
  never raises; a name is never resolved here (``sendto`` would resolve it synchronously and
  block the event loop). The connection manager refuses such destinations before dialling, with
  a clear error; this is the last line of defence.
* :class:`UdpSocket` bound to ``::`` is dual-stack: IPv4 destinations are sent as
  ``::ffff:a.b.c.d`` and IPv4-mapped sources are reported as plain ``a.b.c.d``, so the rest of
  the node only ever sees one spelling of an IPv4 address.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
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
# What sendto answers for a destination this socket cannot reach at all (another family, a
# loopback-bound socket sending off-host, broadcast without SO_BROADCAST). Only for sends: a
# receive that failed like this would fail again, and retrying it would spin.
_SEND_ERRNOS = _TRANSIENT_SEND_ERRNOS | {
    errno.EINVAL,
    errno.EADDRNOTAVAIL,
    errno.EAFNOSUPPORT,
    errno.EACCES,
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


_MAX_CACHED_DESTINATIONS = 4096


class UdpSocket:
    """A kernel UDP socket (IPv4 or IPv6) behind the :class:`DatagramSocket` interface."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._local: Address = (str(host), int(port))
        self._closed = False
        self._gso = hasattr(sock, "sendmsg") and sock.family in (socket.AF_INET, socket.AF_INET6)
        self._ipv6 = sock.family == socket.AF_INET6
        # Destination (as the node spells it) -> what sendto needs, or None: not sendable.
        self._destinations: dict[Address, Address | None] = {}

    @classmethod
    def bind(cls, host: str = "127.0.0.1", port: int = 0, *, buffer_bytes: int = 4 << 20) -> UdpSocket:
        """Bind a UDP socket to ``host:port`` (port 0 picks a free one); raises ``OSError``.

        ``host`` is an IP literal; ``::`` gives a dual-stack socket (``IPV6_V6ONLY`` off,
        whatever the system default) that reaches IPv4 and IPv6 peers.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def bind_with_tcp_port(cls, host: str = "127.0.0.1", port: int = 0, *, attempts: int = 16) -> UdpSocket:
        """:meth:`bind`, where port 0 picks a number TCP can listen on too (a node's TLS-over-TCP
        listener follows its UDP port, ``net.tcp_port`` unset). Why: the kernel picks a free
        *UDP* port, and the same number may be a TCP connection's local port (measured: a test
        node failed to start, "Address already in use", beside a busy daemon). Each pick is
        checked by binding TCP there as the listener will (``SO_REUSEADDR``), at most
        ``attempts`` picks; a race with a connection made between the check and the listen
        remains. Raises ``OSError`` (the last TCP error when no pick worked)."""
        if port != 0:
            return cls.bind(host, port)
        error: OSError | None = None
        for _ in range(attempts):
            udp = cls.bind(host, 0)
            probe = socket.socket(udp._sock.family, socket.SOCK_STREAM)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if udp._sock.family == socket.AF_INET6 and host == "::":
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind((host, udp.local_address[1]))
            except OSError as exc:
                error = exc
                udp.close()
                continue
            finally:
                probe.close()
            return udp
        assert error is not None
        raise error

    @property
    def local_address(self) -> Address:
        return self._local

    def _kernel_destination(self, address: Address) -> Address | None:
        """``address`` as this socket's ``sendto`` needs it, or ``None`` if it cannot be sent
        to without a name lookup or across address families."""
        try:
            return self._destinations[address]
        except (KeyError, TypeError):
            pass
        destination: Address | None = None
        try:
            host, port = address
            if isinstance(host, str) and isinstance(port, int) and 0 < port < 65536 and "%" not in host:
                ip = ipaddress.ip_address(host)
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                if self._ipv6:
                    destination = (f"::ffff:{ip}" if ip.version == 4 else str(ip), port)
                elif ip.version == 4:
                    destination = (str(ip), port)
        except (ValueError, TypeError):
            destination = None
        try:
            if len(self._destinations) >= _MAX_CACHED_DESTINATIONS:
                self._destinations.clear()
            self._destinations[address] = destination
        except TypeError:
            pass  # unhashable junk: not cached, and not sendable either
        return destination

    async def send_to(self, data: bytes, address: Address) -> None:
        destination = self._kernel_destination(address)
        while True:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            if destination is None:
                break  # not sendable from this socket: lost, as the contract says
            try:
                self._sock.sendto(data, destination)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError as exc:
                if exc.errno not in _SEND_ERRNOS:
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
            destination = self._kernel_destination(address)
            if destination is None:
                index += run
                continue
            try:
                if run > 1:
                    self._send_segmented(datagrams, index, run, destination)
                else:
                    self._sock.sendto(data, destination)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError as exc:
                if run > 1 and exc.errno in _GSO_UNSUPPORTED_ERRNOS:
                    self._gso = False  # send this run (and all later ones) one by one
                    continue
                if exc.errno not in _SEND_ERRNOS:
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

    def _send_segmented(
        self, datagrams: Sequence[tuple[bytes, Address]], start: int, run: int, destination: Address
    ) -> None:
        size = len(datagrams[start][0])
        payload = b"".join([datagrams[i][0] for i in range(start, start + run)])
        segment = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))]
        self._sock.sendmsg([payload], segment, 0, destination)

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
                host = str(addr[0])
                if host.startswith("::ffff:") and "." in host:
                    host = host[7:]  # IPv4-mapped: the node spells IPv4 addresses one way
                batch.append((data, (host, int(addr[1]))))
        return batch

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # Outside a trio run nobody can be waiting on it, and notify_closing would raise.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
