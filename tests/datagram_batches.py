"""Datagram batches for the send-batch tests of both tiers (the in-memory driver in
``tests/unit`` and the kernel UDP socket in ``tests/socket``): distinct, numbered datagrams, so
order and boundaries are checkable."""

from __future__ import annotations

from typing import Any

import trio

from lattica.net.datagram import Address


async def receive_datagrams(sock: Any, count: int) -> list[bytes]:
    """The next ``count`` datagrams ``sock`` receives (5 s hang guard)."""
    received: list[bytes] = []
    with trio.fail_after(5):
        while len(received) < count:
            received += [data for data, _ in await sock.receive_batch()]
    return received


def numbered(count: int, size: int, tag: int) -> list[bytes]:
    """``count`` distinct datagrams of ``size`` bytes, so order and boundaries are checkable."""
    return [bytes([tag]) + i.to_bytes(2, "big") + bytes(size - 3) for i in range(count)]


def mixed_batch(a: Address, b: Address) -> tuple[list[tuple[bytes, Address]], list[bytes], list[bytes]]:
    """A batch to two destinations and what each must receive, in order."""
    # Runs of equal sizes (longer than one segmented send may carry), a shorter tail that ends a
    # run, a switch of destination and back, a larger datagram after smaller ones, an empty one.
    to_a = numbered(100, 1200, 1) + numbered(1, 300, 2) + numbered(3, 1200, 3)
    to_b = numbered(5, 1200, 4)
    later_a = numbered(2, 500, 5) + numbered(2, 1400, 6) + [b""]
    batch = [(d, a) for d in to_a] + [(d, b) for d in to_b] + [(d, a) for d in later_a]
    return batch, to_a + later_a, to_b
