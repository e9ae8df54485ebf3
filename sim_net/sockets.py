"""Datagram sockets on the emulated network.

:class:`SimSocket` satisfies lattica's ``DatagramSocket`` protocol structurally (this package
imports nothing from lattica):

* ``send_to`` hands the datagram to the network and returns after one trio checkpoint; it never
  waits for the network, which drops what it cannot carry, as UDP does. ``send_batch`` does the
  same for a list of datagrams, in order, with one checkpoint for the whole list.
* ``receive_batch`` waits for at least one datagram, then returns every queued one (up to
  ``max_datagrams``) without waiting again.
* After ``close()`` both raise ``trio.ClosedResourceError``, including calls already waiting.
  ``close`` is idempotent and frees the port.
* The receive queue is bounded in payload bytes, like a kernel socket buffer: a datagram that
  does not fit is dropped and counted by the network.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import trio

from sim_net.counters import Address

DEFAULT_RECEIVE_BUFFER_BYTES = 4 << 20
"""Same default as lattica's kernel ``UdpSocket`` asks for (4 MiB)."""


class SimSocket:
    """A UDP-like socket bound to ``local_address`` on one emulated host.

    Made by ``Host.bind``; not meant to be built directly.
    """

    def __init__(
        self,
        local_address: Address,
        *,
        receive_buffer_bytes: int,
        send: Callable[[SimSocket, bytes, Address], None],
        on_close: Callable[[SimSocket], None],
    ) -> None:
        self._local_address = local_address
        self._receive_buffer_bytes = receive_buffer_bytes
        self._send = send
        self._on_close = on_close
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._queued_bytes = 0
        self._readers = trio.lowlevel.ParkingLot()
        self._closed = False

    @property
    def local_address(self) -> Address:
        """The ``(host, port)`` this socket is bound to."""
        return self._local_address

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    async def send_to(self, data: bytes, address: Address) -> None:
        """Send one datagram to ``address``; it may be lost, as any datagram may.

        Raises ``trio.ClosedResourceError`` if the socket is closed, ``ValueError`` for an
        address that is not ``(str, port in 0..65535)``, ``RuntimeError`` if the network is
        not running.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("socket closed")
        host, port = address
        if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"bad address {address!r}: expected (str, port in 0..65535)")
        self._send(self, bytes(data), (host, port))
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_batch(self, datagrams: Sequence[tuple[bytes, Address]]) -> None:
        """Send each ``(data, address)`` in order, as :meth:`send_to` would, with one checkpoint
        for the whole batch. Raises like :meth:`send_to`; an address error stops the batch
        there (the datagrams before it were sent)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        for data, address in datagrams:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            host, port = address
            if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(f"bad address {address!r}: expected (str, port in 0..65535)")
            self._send(self, bytes(data), (host, port))
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, Address]]:
        """Wait for at least one datagram, then return all queued ones (at most
        ``max_datagrams``) as ``(payload, source address)`` pairs, oldest first.

        Raises ``trio.ClosedResourceError`` if the socket is or becomes closed, ``ValueError``
        if ``max_datagrams < 1``.
        """
        if max_datagrams < 1:
            raise ValueError(f"max_datagrams must be >= 1, got {max_datagrams!r}")
        if self._queue and not self._closed:
            await trio.lowlevel.checkpoint()
        while not self._queue:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            await self._readers.park()
        if self._closed:
            raise trio.ClosedResourceError("socket closed")
        batch: list[tuple[bytes, Address]] = []
        while self._queue and len(batch) < max_datagrams:
            item = self._queue.popleft()
            self._queued_bytes -= len(item[0])
            batch.append(item)
        return batch

    def close(self) -> None:
        """Release the port and wake any waiting reader with ``ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self._readers.unpark_all()
        self._on_close(self)

    def _enqueue(self, data: bytes, source: Address) -> bool:
        """Queue an arriving datagram; False if the receive buffer has no room for it."""
        if self._closed or self._queued_bytes + len(data) > self._receive_buffer_bytes:
            return False
        self._queue.append((data, source))
        self._queued_bytes += len(data)
        self._readers.unpark_all()
        return True
